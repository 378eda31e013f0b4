"""Concurrent requests gathered into one forward pass, in process: what TorchServe's frontend does with
``batchSize`` and ``maxBatchDelay``, for a door that has no batcher of its own (KServe's model server without the
cluster's batcher sidecar: a laptop, a plain Deployment).

The first request to arrive opens a batch; the batch closes when it holds ``max_batch`` images or ``max_delay``
seconds after it opened, whichever comes first, and runs as one call of ``answer``. One batch runs at a time: the
requests that arrive meanwhile open the next one. A request is never split: one that brings several images joins a
batch whole (and may make it larger than ``max_batch``). ``answer`` contains each request's failure in its own
result, so one bad request still fails alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["MicroBatcher"]


@dataclass
class _Waiting:
    requests: Sequence[object]
    answered: asyncio.Future


class MicroBatcher:
    """``await batcher.submit(requests)`` is ``answer(requests)``, run with the requests of concurrent callers as
    one call, on the default executor (the event loop stays free for health checks)."""

    def __init__(self, answer: Callable[[list], list], max_batch: int, max_delay: float) -> None:
        if max_batch < 1 or max_delay < 0:
            raise ValueError(f"max_batch must be at least 1 and max_delay at least 0, got {max_batch}, {max_delay}")
        self.answer, self.max_batch, self.max_delay = answer, max_batch, max_delay
        self._waiting: list[_Waiting] = []
        self._arrived: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        self.batches: list[int] = []
        """Each batch's number of requests, as run (the tests read it)."""

    async def submit(self, requests: Sequence[object]) -> list:
        loop = asyncio.get_running_loop()
        if self._runner is None or self._runner.done():
            self._arrived = asyncio.Event()
            self._runner = loop.create_task(self._run())
        waiting = _Waiting(list(requests), loop.create_future())
        self._waiting.append(waiting)
        self._arrived.set()
        return await waiting.answered

    def _size(self) -> int:
        return sum(len(w.requests) for w in self._waiting)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            deadline = loop.time() + self.max_delay
            while self._size() < self.max_batch and (left := deadline - loop.time()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), timeout=left)
                except TimeoutError:
                    break
            batch, count = [], 0
            while self._waiting and (not batch or count + len(self._waiting[0].requests) <= self.max_batch):
                waiting = self._waiting.pop(0)
                batch.append(waiting)
                count += len(waiting.requests)
            if not self._waiting:
                self._arrived.clear()
            await self._answer(loop, batch)

    async def _answer(self, loop: asyncio.AbstractEventLoop, batch: list[_Waiting]) -> None:
        flat = [request for waiting in batch for request in waiting.requests]
        self.batches.append(len(flat))
        try:
            results = await loop.run_in_executor(None, self.answer, flat)
        except Exception as error:  # answer contains each request's failure; this is the last line of defence
            for waiting in batch:
                if not waiting.answered.done():
                    waiting.answered.set_exception(error)
            return
        start = 0
        for waiting in batch:
            if not waiting.answered.done():  # a caller that went away (its connection closed) is skipped
                waiting.answered.set_result(results[start : start + len(waiting.requests)])
            start += len(waiting.requests)
