"""Storage: the pool, the tables and their migrations' engine, the ChatKit store and the rate
limiter's statements. Imports nothing of the app but its cross-cutting modules (settings,
errors, ids, context, observability): no HTTP, no agent, no files."""
