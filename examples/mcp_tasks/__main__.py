"""``python -m examples.mcp_tasks``: serve the task manager (settings from TASKS_* variables)."""

from examples.mcp_tasks.server import main

if __name__ == "__main__":
    raise SystemExit(main())
