"""``trim_heap``: memory a turn freed (in a worker thread's malloc arena) goes back to the system."""

from __future__ import annotations

import sys
import threading

import pytest

from switchboard.memory import rss_bytes, trim_heap

MB = 1024 * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_freed_memory_of_a_thread_goes_back_to_the_system() -> None:
    kept: list[bytes] = []

    def turn() -> None:  # like a served turn: a thread allocates ~200 MB in blocks and frees them
        blocks = [bytes(4000) + bytes([i % 256]) for i in range(50_000)]
        kept.append(blocks[-1])  # one survivor at the top of the heap: glibc cannot shrink it by itself
        del blocks

    worker = threading.Thread(target=turn)
    worker.start()
    worker.join()
    before = rss_bytes()
    assert trim_heap() is True
    assert before - rss_bytes() > 100 * MB, (before / MB, rss_bytes() / MB)
