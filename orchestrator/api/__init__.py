"""The OpenAI-compatible HTTP API and the web chat page (``switchboard serve``).

- ``protocol``   request/response models shaped like OpenAI's chat.completions, the typed error
- ``serving``    the logic: requests → turns of the assistant → completions or SSE chunks
- ``router``     the FastAPI routes (thin glue), ``deps`` their dependencies
- ``middleware`` API keys, the body size limit, request metrics; ``metrics`` the Prometheus side
- ``app``        ``create_app(settings, assistant=None)`` assembles it all; ``cli`` runs it with uvicorn
- ``static/``    the web chat page (plain HTML, JS and CSS: no build step, nothing from a CDN)
"""
