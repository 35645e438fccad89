"""What lives in a worker process: the Celery app, the runtime and the MCP session pool."""
