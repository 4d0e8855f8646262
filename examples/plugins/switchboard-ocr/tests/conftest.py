"""The plugin's tests never reach the network (the OCR weights ship inside the installed wheel)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

# The tests import switchboard_ocr from this checkout whether or not the plugin is installed (they
# also run from the main repository's root, where this folder's pytest settings do not apply).
PLUGIN_ROOT = str(Path(__file__).resolve().parent.parent)
if PLUGIN_ROOT not in sys.path:
    sys.path.insert(0, PLUGIN_ROOT)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """OCR runs on weights inside the installed wheel: any connection that leaves the machine is a bug."""
    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address: object) -> None:
        if sock.family != getattr(socket, "AF_UNIX", None):
            host = address[0] if isinstance(address, tuple) else address
            if host not in ("127.0.0.1", "::1", "localhost"):
                raise OSError(f"test tried to reach the network: {address!r}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
