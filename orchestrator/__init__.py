"""Switchboard orchestrator: command language, plans, dispatch, artifacts, the core loop and the API."""

__version__ = "0.1.0"
