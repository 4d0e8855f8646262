"""The Celery side of Switchboard.

- workers.app: the app the workers run (``celery -A workers.app worker|flower``)
- workers.config: its configuration (the broker URL is required), the worker's registry, the Redis key
  names, and the queue depths kombu's Redis layout gives
- workers.routing: queues and time limits derived from the expert registry
- workers.tasks: the one task that runs any expert by name
- workers.dispatch: QueuedDispatcher, the orchestrator's side
- workers.cli: ``switchboard worker``
- workers.transport: kombu's Redis transport, reusing its client objects
- workers.testing: real redis-server and worker processes for integration tests and benchmarks
"""
