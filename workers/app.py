"""The Celery app the workers run: ``celery -A workers.app worker`` / ``celery -A workers.app flower``.

``switchboard worker --experts …`` (workers.cli) is the usual way to start a worker. Importing this
module loads no model: experts are constructed lazily, and set up inside the pool process that runs
their first call (never in a prefork parent).

This is where a worker process reads its settings (``SWITCHBOARD_*``); without
``SWITCHBOARD_BROKER_URL`` importing it fails with workers.config.BrokerNotConfigured, which says so.
"""

from __future__ import annotations

from switchboard.settings import get_settings
from workers.config import TASK_NAME, create_app

app = create_app(get_settings())

__all__ = ["TASK_NAME", "app"]
