"""Switchboard orchestrator: the command language, plans, dispatch, the core loop, the API and the CLI."""
