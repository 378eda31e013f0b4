"""The in-process micro-batcher of KServe's model server: concurrent requests share one call of the service, up to
the archive's batchSize and within its maxBatchDelay; a request is never split; one bad request fails alone."""

from __future__ import annotations

import asyncio
import base64
import threading
import time

import numpy as np
import pytest
import torch

from camserve.batching import MicroBatcher
from tests.conftest import ROOT, encode


class Recorder:
    """answer() that records each call's requests, takes ``seconds``, and answers each request with itself × 10."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.calls: list[list[int]] = []
        self.seconds = seconds
        self.running = 0
        self.overlapped = False
        self._lock = threading.Lock()

    def __call__(self, requests: list[int]) -> list[int]:
        with self._lock:
            self.running += 1
            self.overlapped |= self.running > 1
        self.calls.append(list(requests))
        time.sleep(self.seconds)
        with self._lock:
            self.running -= 1
        return [r * 10 for r in requests]


async def _concurrently(batcher: MicroBatcher, groups: list[list[int]]) -> list[list[int]]:
    return list(await asyncio.gather(*(batcher.submit(group) for group in groups)))


def test_concurrent_requests_share_one_call_and_each_gets_its_own_answer():
    answer = Recorder()
    batcher = MicroBatcher(answer, max_batch=8, max_delay=0.05)
    results = asyncio.run(_concurrently(batcher, [[n] for n in range(8)]))
    assert results == [[n * 10] for n in range(8)]
    assert answer.calls == [list(range(8))]  # one call: the batch filled before the delay ran out


def test_a_batch_closes_at_max_batch_and_the_rest_open_the_next_one_run_after_it():
    answer = Recorder()
    batcher = MicroBatcher(answer, max_batch=4, max_delay=0.2)
    results = asyncio.run(_concurrently(batcher, [[n] for n in range(10)]))
    assert results == [[n * 10] for n in range(10)]
    assert [len(call) for call in answer.calls] == [4, 4, 2] and not answer.overlapped  # one batch at a time


def test_a_lone_request_waits_at_most_the_delay_and_a_request_is_never_split():
    answer = Recorder(seconds=0.0)
    batcher = MicroBatcher(answer, max_batch=4, max_delay=0.02)

    async def scenario():
        started = time.perf_counter()
        alone = await batcher.submit([1])
        waited = time.perf_counter() - started
        several = await _concurrently(batcher, [[1, 2, 3], [4, 5, 6], [7]])
        return alone, waited, several

    alone, waited, several = asyncio.run(scenario())
    assert alone == [10] and waited < 1.0  # the delay (20 ms) and no more, give or take a busy machine
    assert several == [[10, 20, 30], [40, 50, 60], [70]]
    assert answer.calls[1:] == [[1, 2, 3], [4, 5, 6, 7]]  # the second request did not fit whole: the next batch


def test_a_failing_call_fails_only_its_batchs_callers_and_the_batcher_goes_on():
    calls = []

    def answer(requests):
        calls.append(list(requests))
        if 13 in requests:
            raise RuntimeError("injected")
        return requests

    batcher = MicroBatcher(answer, max_batch=2, max_delay=0.01)

    async def scenario():
        outcomes = await asyncio.gather(*(batcher.submit([n]) for n in (13, 1, 2)), return_exceptions=True)
        return outcomes, await batcher.submit([5])

    outcomes, later = asyncio.run(scenario())
    assert isinstance(outcomes[0], RuntimeError) and isinstance(outcomes[1], RuntimeError) and outcomes[2] == [2]
    assert later == [5]


@pytest.fixture(scope="module")
def kserve_model(tmp_path_factory):
    """tests/models/tiny_net.py's archive behind camserve.kserve.CamModel, in process."""
    from camserve.kserve import CamModel, unpacked_archive
    from camtools.archive import ServingConfig, build_archive
    from camtools.models import prepare_model

    folder = tmp_path_factory.mktemp("batching")
    prepared = prepare_model(model_file=ROOT / "tests" / "models" / "tiny_net.py", weights="random", input_size=64)
    mar = build_archive(prepared, folder / "store", ServingConfig(batch_size=8, max_batch_delay_ms=50))
    model = CamModel(unpacked_archive(mar, folder), torch.device("cpu"))
    assert model.load()
    return model


def test_kserves_server_answers_eight_concurrent_requests_in_one_pass_and_a_bad_one_fails_alone(kserve_model):
    assert (kserve_model.batcher.max_batch, kserve_model.batcher.max_delay) == (8, 0.05)  # the archive's
    images = [np.asarray(np.random.default_rng(n).integers(0, 256, (48, 64, 3)), np.uint8) for n in range(7)]
    instances = [{"data": base64.b64encode(encode(image, "PNG")).decode()} for image in images]
    bad = {"data": "@@not base64@@"}
    passes = []
    handle = kserve_model.service.engine.model.register_forward_hook(lambda *_: passes.append(1))

    async def concurrently():
        payloads = [{"instances": [instance]} for instance in instances[:3]] + [{"instances": [bad]}]
        payloads += [{"instances": [instance]} for instance in instances[3:]]
        return await asyncio.gather(*(kserve_model.predict(payload) for payload in payloads))

    try:
        before = len(kserve_model.batcher.batches)
        answers = asyncio.run(concurrently())
    finally:
        handle.remove()
    bodies = [answer["predictions"][0] for answer in answers]
    assert bodies[3]["code"] == 400 and "base64" in bodies[3]["message"]
    good = bodies[:3] + bodies[4:]
    assert all("explanations" in body for body in good)
    assert kserve_model.batcher.batches[before:] == [8] and len(passes) == 1  # one batch, one forward pass
    alone = [asyncio.run(kserve_model.predict({"instances": [instance]}))["predictions"][0] for instance in instances]
    for together, single in zip(good, alone, strict=True):
        assert together["predictions"] == single["predictions"]
        assert together["explanations"][0]["overlay"] == single["explanations"][0]["overlay"]
