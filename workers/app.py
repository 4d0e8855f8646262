"""The Celery app the workers run: ``celery -A workers.app worker`` / ``celery -A workers.app flower``.

``switchboard worker --experts …`` (workers.cli) is the usual way to start a worker. Importing this
module loads no model: experts are constructed lazily, and set up inside the pool process that runs
their first call (never in a prefork parent).
"""

from __future__ import annotations

from workers.config import TASK_NAME, create_app

app = create_app()

__all__ = ["TASK_NAME", "app"]
