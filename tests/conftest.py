"""Shared fixtures. The suite never reaches the network and never depends on what plugins are installed."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import pytest

# Offline, before anything imports transformers/ultralytics/huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("YOLO_CONFIG_DIR", str(REPO / ".cache" / "ultralytics"))


def _is_loopback(address: object) -> bool:
    if isinstance(address, tuple) and address:
        host = address[0]
    elif isinstance(address, str | bytes):  # unix sockets
        return True
    else:
        return False
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch):
    """Fail any connection attempt that leaves the machine (loopback and unix sockets are fine)."""
    attempts: list[object] = []
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def guard(sock: socket.socket, address: object) -> None:
        if sock.family == getattr(socket, "AF_UNIX", None) or _is_loopback(address):
            return
        attempts.append(address)
        raise OSError(f"test tried to reach the network: {address!r}")

    def connect(self: socket.socket, address: object):
        guard(self, address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: object):
        guard(self, address)
        return real_connect_ex(self, address)

    def getaddrinfo(host, *a, **k):
        if host not in (None, "localhost") and not _is_loopback((host,)):
            attempts.append(host)
            raise OSError(f"test tried to resolve {host!r}")
        return real_getaddrinfo(host, *a, **k)

    real_getaddrinfo = socket.getaddrinfo
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts
    assert not attempts, f"network access attempted: {attempts}"


@pytest.fixture
def store(tmp_path: Path):
    from switchboard.artifacts import ArtifactStore

    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def settings_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Point settings at a temporary artifact dir (and clear the settings cache around the test)."""
    from switchboard.settings import get_settings

    monkeypatch.setenv("SWITCHBOARD_ARTIFACT_DIR", str(tmp_path / "artifacts"))
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture
def registry():
    """A registry with only the built-in entry points of this distribution (plugins installed in the
    environment are ignored), so tests do not depend on what else is installed."""
    from importlib.metadata import entry_points

    from switchboard.registry import GROUP, Registry

    reg = Registry()
    for ep in entry_points(group=GROUP):
        if ep.dist is not None and ep.dist.name == "switchboard":
            reg.register(ep.load(), "switchboard")
    return reg
