"""The conversation: the ChatKit server, the agent and its models, the item converter, titles,
dictation, plugins and MCP identity. Stands on app.pg and app.files; knows no HTTP."""
