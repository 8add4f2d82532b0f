"""chatkit-pg: a PostgreSQL backend for OpenAI ChatKit."""
