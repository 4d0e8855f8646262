"""Real Redis and real worker processes for integration tests and benchmarks.

A plugin author can test an expert through Celery the same way the project does::

    with RedisServer(tmp_path / "redis") as redis_server:
        env = worker_env(redis_server.url, tmp_path / "artifacts", extra_experts="my_pkg.expert:MyExpert")
        with WorkerProcess(["my_expert"], env=env, log_path=tmp_path / "worker.log") as worker:
            ...  # QueuedDispatcher(registry, store, settings=Settings(broker_url=redis_server.url, …))

Every process is started in its own session and killed with its whole process group on exit.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL, wait: float = 10.0) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=wait)


class RedisServer:
    """A ``redis-server`` on a free loopback port with its own directory and AOF on."""

    def __init__(self, directory: Path | str, *, port: int | None = None, binary: str | None = None,
                 fsync: str = "always") -> None:
        self.dir = Path(directory)
        self.port = port or free_port()
        self.binary = binary or shutil.which("redis-server") or "/usr/bin/redis-server"
        self.fsync = fsync
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        if not Path(self.binary).exists():
            raise RuntimeError(f"redis-server not found ({self.binary}); install it: apt-get install -y redis-server")
        self.dir.mkdir(parents=True, exist_ok=True)
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
               "--appendonly", "yes", "--appendfsync", self.fsync, "--save", "",
               "--maxmemory-policy", "noeviction", "--daemonize", "no", "--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                self.proc = None
                raise RuntimeError(f"redis-server exited:\n{log}")
            if self.ping():
                return self
            time.sleep(0.05)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout} s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server: SIGTERM is a clean shutdown (AOF flushed), SIGKILL a crash."""
        if self.proc is not None:
            _kill_group(self.proc, sig)
            self.proc = None

    def restart(self, sig: int = signal.SIGTERM, down_for: float = 0.0) -> None:
        self.stop(sig)
        time.sleep(down_for)
        self.start()

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop(signal.SIGKILL)


def worker_env(broker_url: str, artifact_dir: Path | str, *, extra_experts: str = "",
               **overrides: str) -> dict[str, str]:
    """Environment for worker processes: the broker, the shared store, extra experts, the repo on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    path = [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update({
        "PYTHONPATH": os.pathsep.join(path),
        "PYTHONUNBUFFERED": "1",
        "SWITCHBOARD_BROKER_URL": broker_url,
        "SWITCHBOARD_ARTIFACT_DIR": str(artifact_dir),
        "SWITCHBOARD_EXTRA_EXPERTS": extra_experts,
    })
    env.update(overrides)
    return env


def switchboard_command() -> list[str]:
    """How to run ``switchboard``: the console script next to this interpreter, else ``-m``."""
    script = Path(sys.executable).with_name("switchboard")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "orchestrator.cli"]


class WorkerProcess:
    """A ``switchboard worker`` subprocess (its own process group), ready when Celery says so."""

    def __init__(self, experts: Sequence[str], *, env: dict[str, str], log_path: Path | str,
                 concurrency: int = 1, pool: str = "prefork", name: str | None = None,
                 loglevel: str = "info", extra_args: Sequence[str] = ()) -> None:
        self.experts = list(experts)
        self.env = dict(env)
        self.log_path = Path(log_path)
        self.name = name or f"{'+'.join(self.experts)}-{free_port()}"
        self.cmd = [*switchboard_command(), "worker", "--experts", ",".join(self.experts), "--concurrency",
                    str(concurrency), "--pool", pool, "--loglevel", loglevel, "--hostname", f"{self.name}@%h",
                    *extra_args]
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def launch(self) -> WorkerProcess:
        """Start the process without waiting for it (see ``wait_ready``, or use ``start``)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=str(REPO_ROOT), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        """Start the worker and wait until it consumes its queues."""
        self.launch()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the worker consumes: its log says "ready." (info level) or it answers a ping."""
        from celery import Celery

        app = Celery("switchboard-testing", broker=self.env["SWITCHBOARD_BROKER_URL"], set_as_current=False)
        node = f"{self.name}@{socket.gethostname()}"
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if " ready." in self.log():
                    return
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"worker {self.name} exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
                if "[queues]" in self.log() and self._ping(app, node):
                    return
                time.sleep(0.05)
        finally:
            app.close()
        raise TimeoutError(f"worker {self.name} not ready after {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"worker {self.name}: {text!r} not in its log after {timeout} s:\n{self.log()[-3000:]}")

    @staticmethod
    def _ping(app: Any, node: str) -> bool:
        try:
            return bool(app.control.ping([node], timeout=0.3))
        except Exception:  # a pooled connection from before a Redis restart fails once
            return False

    def child_pids(self) -> list[int]:
        """Pids of the pool processes (children of the worker's main process)."""
        try:
            out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.pid)], capture_output=True, text=True,
                                 check=False).stdout
        except FileNotFoundError:
            return []
        return [int(x) for x in out.split()]

    def kill(self) -> None:
        """``kill -9`` the whole worker: its main process and every pool process."""
        if self.proc is not None:
            _kill_group(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        self.kill()

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
