"""Soak: many mixed turns against a real server process, then retention.

    python benchmarks/soak.py [--json] [--turns 300] [--concurrency 20]

A `switchboard serve` process (the embedded default: the shipped core, the router, every built-in
expert, in-process dispatch) is started on a free loopback port with its own artifact and
conversation folders and two API keys. ``--turns`` turns are sent, ``--concurrency`` at a time, with
the real HTTP API (httpx; half of them streamed), mixing:

- ``text``: a plain question; ``detect``, ``segment``: a shapes-world image and a request;
  ``generate``: a picture from a prompt; ``edit``: an image, segment the object and recolour it;
- ``follow-up``: a later turn of an earlier conversation of the same key ("now make it green",
  "now segment it", "how many are there?").

Reported: ``errors`` (a non-200 answer, an error frame in a stream, a broken connection; target 0),
call outcomes (the core may write a call that fails: that is not a serving error), turn latency
p50/p95, the server's RSS after turn 30 and after the last turn and their ratio
``rss_last_over_turn30`` (target ≤ 1.10: nothing per turn is retained), then the artifact count
before and after ``switchboard gc --days 0`` (a retention of 0 days: every conversation is expired,
so only the artifacts of live conversations — none — may remain: ``artifacts_after_gc`` must equal
``artifacts_of_live_conversations``), and the same check over the conversations.

Numbers depend on the machine and what else runs on it (the RSS ratio much less than latency).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: python benchmarks/soak.py
    sys.path.insert(0, str(REPO_ROOT))

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "YOLO_OFFLINE"):
    os.environ.setdefault(_var, "1")

KEYS = ("sk-soak-a", "sk-soak-b")
KINDS = ("text", "detect", "segment", "generate", "edit", "follow-up")
MB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_of(pid: int) -> int:
    """Resident set size of a process (bytes), from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def scenes(n: int) -> list[tuple[str, str]]:
    """``n`` shapes-world images as (data URI, the label of one of their objects)."""
    from training.shapes import make_scene

    out = []
    for seed in range(n):
        scene = make_scene(1000 + seed)
        buf = io.BytesIO()
        scene.image.save(buf, format="PNG")
        out.append((f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}", scene.objects[-1].label))
    return out


class Server:
    """``switchboard serve`` in a child process, with its own stores."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "SWITCHBOARD_ARTIFACT_DIR": str(root / "artifacts"),
                    "SWITCHBOARD_CONVERSATIONS_DIR": str(root / "conversations"),
                    "SWITCHBOARD_API_KEYS": json.dumps(list(KEYS))}
        self.env.pop("SWITCHBOARD_BROKER_URL", None)  # the embedded default: in-process dispatch
        self.log = open(root / "server.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", "--port", str(self.port),
                                      "--log-level", "warning"], cwd=REPO_ROOT, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def wait_loaded(self, timeout: float = 900) -> float:
        """Wait until the preloaded assistant is ready; the seconds it took."""
        import httpx

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}); see {self.root / 'server.log'}")
            try:
                state = httpx.get(f"{self.url}/healthz", timeout=5).json().get("assistant")
                if state == "loaded":
                    return time.monotonic() - t0
                if state == "failed":
                    raise RuntimeError(f"the assistant failed to load; see {self.root / 'server.log'}")
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("the server did not load the assistant in time")

    @property
    def rss(self) -> int:
        return rss_of(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Soak:
    """The turns, their bookkeeping, and the RSS samples."""

    def __init__(self, server: Server, turns: int, concurrency: int, seed: int = 0) -> None:
        import httpx

        self.server = server
        self.turns = turns
        self.concurrency = concurrency
        self.rng = random.Random(seed)
        self.images = scenes(12)
        self.clients = {k: httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {k}"},
                                        timeout=httpx.Timeout(900, connect=30)) for k in KEYS}
        self.lock = threading.Lock()
        self.done = 0
        self.rss_turn30: int | None = None
        self.errors: list[str] = []
        self.latency: dict[str, list[float]] = {k: [] for k in KINDS}
        self.calls: dict[str, int] = {}
        # key -> [(conversation id, kind of its last turn)], for follow-ups
        self.conversations: dict[str, list[tuple[str, str]]] = {k: [] for k in KEYS}

    # -- one turn -----------------------------------------------------------------------------------
    def _request(self, i: int) -> tuple[str, str, dict[str, Any]]:
        kind = KINDS[i % len(KINDS)]
        key = KEYS[i % 2]
        uri, label = self.images[i % len(self.images)]
        colour = ("green", "blue", "yellow")[i % 3]

        def user(text: str, image: bool = False) -> dict[str, Any]:
            if not image:
                return {"role": "user", "content": text}
            return {"role": "user", "content": [{"type": "text", "text": text},
                                                {"type": "image_url", "image_url": {"url": uri}}]}

        body: dict[str, Any] = {"model": "switchboard", "stream": i % 2 == 0}
        if kind == "follow-up":
            with self.lock:
                earlier = list(self.conversations[key])
            if earlier:
                conv, last = earlier[self.rng.randrange(len(earlier))]
                text = {"detect": "now segment it", "segment": f"now make it {colour}",
                        "edit": "now make it red", "generate": "how many shapes are there?"}.get(last, "thanks!")
                return kind, key, {**body, "conversation_id": conv, "messages": [user(text)]}
            kind = "text"
        if kind == "text":
            return kind, key, {**body, "messages": [user(("hello, what can you do?", "what is an artifact?",
                                                           "thanks, that is all")[i % 3])]}
        if kind == "detect":
            return kind, key, {**body, "messages": [user(f"find the {label}", image=True)]}
        if kind == "segment":
            return kind, key, {**body, "messages": [user(f"segment the {label}", image=True)]}
        if kind == "generate":
            shape = ("circle", "square", "triangle")[i % 3]
            return kind, key, {**body, "messages": [user(f"draw a {colour} {shape} on a grey background")]}
        return kind, key, {**body, "messages": [user(f"segment the {label} and make it {colour}", image=True)]}

    def turn(self, i: int) -> None:
        kind, key, body = self._request(i)
        t0 = time.perf_counter()
        try:
            conv, calls, error = self._send(key, body)
        except Exception as e:  # a broken connection, a timeout
            conv, calls, error = None, [], f"{type(e).__name__}: {e}"
        seconds = time.perf_counter() - t0
        with self.lock:
            self.latency[kind].append(seconds)
            if error:
                self.errors.append(f"turn {i} ({kind}): {error[:300]}")
            for status in calls:
                self.calls[status] = self.calls.get(status, 0) + 1
            if conv:
                self.conversations[key].append((conv, kind if kind != "follow-up" else "edit"))
            self.done += 1
            if self.done == min(30, self.turns):
                self.rss_turn30 = self.server.rss

    def _send(self, key: str, body: dict[str, Any]) -> tuple[str | None, list[str], str | None]:
        client = self.clients[key]
        if not body["stream"]:
            r = client.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                return None, [], f"HTTP {r.status_code}: {r.text}"
            data = r.json()
            calls = [c.get("status", "?") for c in data["choices"][0]["message"].get("tool_calls") or []]
            return data.get("conversation_id"), calls, None
        conv, calls, error, finished = None, [], None, False
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                return None, [], f"HTTP {r.status_code}: {r.text}"
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    finished = True
                    continue
                chunk = json.loads(payload)
                if "error" in chunk:
                    error = f"error frame: {chunk['error'].get('message')}"
                    continue
                conv = chunk.get("conversation_id") or conv
                for choice in chunk.get("choices") or []:
                    for tc in (choice.get("delta") or {}).get("tool_calls") or []:
                        calls.append(tc.get("status", "?"))
        if not finished and error is None:
            error = "the stream ended without data: [DONE]"
        return conv, calls, error

    def run(self) -> None:
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="soak") as pool:
            list(pool.map(self.turn, range(self.turns)))

    def close(self) -> None:
        for c in self.clients.values():
            c.close()


def count_store(root: Path) -> tuple[int, int, int]:
    """(artifacts, conversations, artifacts referenced by the conversations)."""
    from orchestrator.session import ConversationStore

    artifacts = len(list((root / "artifacts" / "meta").glob("*.json")))
    convs = list(ConversationStore(root / "conversations"))
    return artifacts, len(convs), len({a for c in convs for a in c.artifacts})


def gc(server: Server, days: float) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "gc", "--days", str(days), "--json"],
                          cwd=REPO_ROOT, env=server.env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"switchboard gc failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--turns", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--keep", type=Path, default=None, help="keep the stores and the server log in this folder")
    args = p.parse_args(argv)

    root = args.keep or Path(tempfile.mkdtemp(prefix="switchboard-soak-"))
    root.mkdir(parents=True, exist_ok=True)
    server = Server(root)
    out: dict[str, Any] = {"turns": args.turns, "concurrency": args.concurrency, "cpus": os.cpu_count()}
    try:
        out["load_s"] = round(server.wait_loaded(), 1)
        out["rss_loaded_mb"] = round(server.rss / MB, 1)
        soak = Soak(server, args.turns, args.concurrency)
        t0 = time.perf_counter()
        try:
            soak.run()
        finally:
            soak.close()
        out["wall_s"] = round(time.perf_counter() - t0, 1)
        rss_last = server.rss
        out["errors"] = len(soak.errors)
        out["error_samples"] = soak.errors[:5]
        out["calls"] = dict(sorted(soak.calls.items()))
        every = [s for v in soak.latency.values() for s in v]
        out["turn_s"] = {"p50": pct(every, 0.5), "p95": pct(every, 0.95),
                         **{k: {"n": len(v), "p50": pct(v, 0.5)} for k, v in soak.latency.items() if v}}
        out["rss_turn30_mb"] = round((soak.rss_turn30 or 0) / MB, 1)
        out["rss_last_mb"] = round(rss_last / MB, 1)
        out["rss_last_over_turn30"] = round(rss_last / soak.rss_turn30, 3) if soak.rss_turn30 else None
    finally:
        server.stop()
    before = count_store(root)
    report = gc(server, 0)
    after = count_store(root)
    out.update({"artifacts_before_gc": before[0], "conversations_before_gc": before[1],
                "artifacts_after_gc": after[0], "conversations_after_gc": after[1],
                "artifacts_of_live_conversations": after[2], "gc": report,
                "gc_ok": after[0] == after[2] and after[1] == report["conversations_kept"]})
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k:32} {v}")
    return 0 if out["errors"] == 0 and out["gc_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
