"""The task manager of chatkit-pg's original design, as an MCP server that knows who is asking.

Each tool call carries the backend's signed identity token (``_meta["chatkit-pg/identity"]``);
the server verifies it against the backend's JWKS and keeps every user's tasks apart in
PostgreSQL. ``python -m examples.mcp_tasks`` runs it; README.md here explains the setup.
"""
