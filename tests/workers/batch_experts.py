"""An expert with a real ``run_batch`` for the batching tests, in-process and in worker processes
(``SWITCHBOARD_EXTRA_EXPERTS=tests.workers.batch_experts:EchoExpert``).

Each ``run_batch`` and each ``run`` appends one line to ``WT_BATCH_LOG`` (when set): how many calls it
ran, which texts, and in which process, so a test can see how calls were grouped.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

from pydantic import BaseModel

from switchboard.expert import Expert, ExpertResult, RunContext


class EchoArgs(BaseModel):
    text: str
    mode: str = "ok"  # ok | boom (the call raises; a batch holding it raises) | wrongtype | block


class EchoResult(ExpertResult):
    text: str
    batch_size: int
    pid: int


def _log(kind: str, texts: list[str]) -> None:
    path = os.environ.get("WT_BATCH_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{kind} {len(texts)} {os.getpid()} {','.join(texts)}\n")


class EchoExpert(Expert):
    name = "wt_echo"
    description = "Test expert: echo the text back, batched; 'boom' raises, 'block' waits for release()."
    Args = EchoArgs
    Result = EchoResult

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []
        self.gate = threading.Event()  # "block" calls wait on it (in-process tests)

    def release(self) -> None:
        self.gate.set()

    def _one(self, args: EchoArgs, ctx: RunContext, size: int) -> EchoResult:
        if args.mode == "boom":
            raise ValueError(f"boom on {args.text}")
        if args.mode == "block":
            self.gate.wait(30)
        ctx.progress(0.5, f"echoing {args.text}")
        return EchoResult(summary=f"echo {args.text}", text=args.text, batch_size=size, pid=os.getpid())

    def run(self, args: EchoArgs, ctx: RunContext) -> EchoResult:
        self.batches.append([args.text])
        _log("run", [args.text])
        return self._one(args, ctx, 1)

    def run_batch(self, items: Sequence[tuple[EchoArgs, RunContext]]) -> list[ExpertResult]:
        texts = [a.text for a, _ in items]
        self.batches.append(texts)
        _log("batch", texts)
        out: list[ExpertResult] = []
        for args, ctx in items:
            if args.mode == "wrongtype":
                out.append(ExpertResult(summary="not an EchoResult"))
            else:
                out.append(self._one(args, ctx, len(items)))
        return out


SPEC = f"{__name__}:EchoExpert"
