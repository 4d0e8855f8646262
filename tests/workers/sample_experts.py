"""Real Expert subclasses for the worker tests, loaded by worker processes through
``SWITCHBOARD_EXTRA_EXPERTS=tests.workers.sample_experts:MakeExpert,…`` (see ``SPEC``).

They leave traces in files named by their arguments (or by ``WT_SETUP_LOG``), so a test can count
how often each really ran and in which process.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from pydantic import BaseModel

from switchboard.expert import BoxesRef, Expert, ExpertResult, RunContext


def _append(path: str, line: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


class _Traced(Expert):
    abstract = True

    def setup(self) -> None:
        log = os.environ.get("WT_SETUP_LOG")
        if log:
            _append(log, f"{self.name} {os.getpid()}")


class PidResult(ExpertResult):
    pid: int


# -- a plan with a reference: make -> use ------------------------------------------------------------
class MakeArgs(BaseModel):
    text: str


class MakeExpert(_Traced):
    name = "wt_make"
    description = "Test expert: store a boxes artifact holding the text."
    Args = MakeArgs
    Result = PidResult

    def run(self, args: MakeArgs, ctx: RunContext) -> PidResult:
        ctx.progress(0.5, "half way")
        art = ctx.save_json({"boxes": [], "text": args.text}, kind="boxes", role="boxes")
        return PidResult(summary=f"made {args.text}", artifacts=[art], pid=os.getpid())


class UseArgs(BaseModel):
    boxes: BoxesRef


class UseExpert(_Traced):
    name = "wt_use"
    description = "Test expert: read the boxes artifact another call made."
    Args = UseArgs
    Result = PidResult

    def run(self, args: UseArgs, ctx: RunContext) -> PidResult:
        data = ctx.read_json(args.boxes)
        return PidResult(summary=f"used {data['text']}", pid=os.getpid())


# -- slow calls that leave one line per completed execution ------------------------------------------
class SlowArgs(BaseModel):
    seconds: float
    marker: str


class SlowExpert(_Traced):
    name = "wt_slow"
    description = "Test expert: sleep with progress, then append one line to the marker file."
    Args = SlowArgs
    Result = PidResult
    time_limit = 20.0

    def run(self, args: SlowArgs, ctx: RunContext) -> PidResult:
        steps = 10
        for i in range(steps):
            time.sleep(args.seconds / steps)
            ctx.progress((i + 1) / steps, f"step {i + 1}")
        _append(args.marker, f"{ctx.call_id} {os.getpid()}")
        return PidResult(summary=f"slept {args.seconds} s", pid=os.getpid())


# -- failures ----------------------------------------------------------------------------------------
class CrashArgs(BaseModel):
    marker: str


class CrashExpert(_Traced):
    name = "wt_crash"
    description = "Test expert: kill the process that runs it, every time."
    Args = CrashArgs
    Result = PidResult
    time_limit = 10.0

    def run(self, args: CrashArgs, ctx: RunContext) -> PidResult:
        _append(args.marker, f"{ctx.call_id} {os.getpid()}")
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


class SleepyArgs(BaseModel):
    seconds: float
    stubborn: bool = False


class SleepyExpert(_Traced):
    name = "wt_sleepy"
    description = "Test expert with a 1 s time limit; `stubborn` ignores the soft limit."
    Args = SleepyArgs
    Result = PidResult
    time_limit = 1.0

    def run(self, args: SleepyArgs, ctx: RunContext) -> PidResult:
        from celery.exceptions import SoftTimeLimitExceeded

        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            try:
                time.sleep(max(0.0, min(0.05, end - time.monotonic())))
            except SoftTimeLimitExceeded:
                if not args.stubborn:
                    raise
        return PidResult(summary=f"slept {args.seconds} s", pid=os.getpid())


class FlakyArgs(BaseModel):
    marker: str
    mode: str = "transient"  # transient: fail once with ConnectionError; broken: always ValueError


class FlakyExpert(_Traced):
    name = "wt_flaky"
    description = "Test expert: fails once with a transient error, or always with a bug."
    Args = FlakyArgs
    Result = PidResult

    def run(self, args: FlakyArgs, ctx: RunContext) -> PidResult:
        _append(args.marker, f"{ctx.call_id} {os.getpid()}")
        attempts = len(Path(args.marker).read_text().splitlines())
        if args.mode == "broken":
            raise ValueError("a bug, not worth retrying")
        if attempts == 1:
            raise ConnectionError("the store blinked")
        return PidResult(summary=f"worked on attempt {attempts}", pid=os.getpid())


class OrphanArgs(BaseModel):
    marker: str


class OrphanExpert(_Traced):
    name = "wt_orphan"
    description = "Test expert whose queue no worker serves at first."
    Args = OrphanArgs
    Result = PidResult
    time_limit = 1.0

    def run(self, args: OrphanArgs, ctx: RunContext) -> PidResult:
        _append(args.marker, f"{ctx.call_id} {os.getpid()}")
        return PidResult(summary="ran", pid=os.getpid())


ALL = [MakeExpert, UseExpert, SlowExpert, CrashExpert, SleepyExpert, FlakyExpert, OrphanExpert]
SPEC = ",".join(f"{__name__}:{cls.__name__}" for cls in ALL)
