"""The Celery tasks: thin wrappers over the orchestrator and worker runtime."""
