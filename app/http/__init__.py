"""The web service: the ChatKit endpoint, SSE, authentication, middleware, health routes, the
dev page and the runtime handed to routes. Stands on every layer below it."""
