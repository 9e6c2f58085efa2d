"""request_timeout_s bounds a whole request, the wait for its first token included: past it,
a 504 (or, once a stream has started, a 504 error event) and the engine request is aborted.

The engine is held still by a call that blocks its loop thread between two steps (what a
slow step or a long adapter load would do), so no test depends on how fast the machine is."""

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient

from tests.api.server import make_app, wait_idle

TIMEOUT_S = 1.0
CHAT = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def server(tiny_smol_dir):
    app, engine = make_app(tiny_smol_dir, max_model_len=512, server={"request_timeout_s": TIMEOUT_S})
    with TestClient(app) as client:
        yield client, engine
    engine.shutdown()


@contextmanager
def engine_held(engine):
    """The engine's loop thread is blocked (no step runs) until the block ends."""
    entered, release = threading.Event(), threading.Event()

    def hold(_engine):
        entered.set()
        release.wait(60)

    holder = threading.Thread(target=lambda: asyncio.run(engine.call(hold)), daemon=True)
    holder.start()
    assert entered.wait(10)
    try:
        yield
    finally:
        release.set()
        holder.join(10)


@pytest.mark.parametrize("stream", [False, True])
def test_no_first_token_within_the_timeout_is_a_504(server, stream):
    http, engine = server
    body = {"messages": CHAT, "max_tokens": 4, "stream": stream}
    with ThreadPoolExecutor(1) as pool, engine_held(engine):
        # The answer comes while the engine is still held: it does not wait for a first token.
        r = pool.submit(http.post, "/v1/chat/completions", json=body).result(timeout=20 * TIMEOUT_S)
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "timeout" and r.json()["error"]["type"] == "timeout_error"
    assert not wait_idle(engine).running and not engine.engine.requests  # added, then aborted


def test_a_stream_that_outlives_the_timeout_ends_with_a_504_event(server, caplog):
    http, engine = server
    body = {"messages": CHAT, "max_tokens": 400, "stream": True, "ignore_eos": True}
    with caplog.at_level("INFO", logger="kiln_ray.api"), http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = (line for line in r.iter_lines() if line.startswith("data: "))
        first = json.loads(next(lines)[len("data: "):])
        assert first["choices"][0]["delta"]["role"] == "assistant"
        with engine_held(engine):
            rest = [line[len("data: "):] for line in lines]
    errors = [json.loads(e)["error"] for e in rest if e != "[DONE]" and "error" in json.loads(e)]
    assert [e["code"] for e in errors] == ["timeout"] and rest[-1] == "[DONE]"
    assert any(" chat " in m and "finish=error" in m for m in caplog.messages)  # not logged as a success
    wait_idle(engine)
    assert not engine.engine.requests


def test_the_first_failing_prompt_of_a_multi_prompt_request_stops_the_others():
    """EngineStreams.consume_all: one prompt's engine stream fails, and the other prompts'
    streams are closed at once (closing is what aborts their engine requests) instead of
    running on for a reply that has already failed."""
    import asyncio

    from kiln_ray.api.errors import APIError
    from kiln_ray.api.streaming import EngineStreams, Timing
    from kiln_ray.metrics import Metrics

    closed = []

    async def endless(name):
        try:
            while True:
                await asyncio.sleep(0.01)
                yield []
        finally:
            closed.append(name)

    async def failing():
        yield []
        raise ValueError("this prompt failed")

    async def main():
        streams = EngineStreams(None, Metrics("ingress"), stream_interval=1, request_timeout_s=60)
        loop = asyncio.get_running_loop()
        timings = [Timing(deadline=loop.time() + 60) for _ in range(3)]
        started = [(None, endless("a")), (None, failing()), (None, endless("c"))]
        with pytest.raises(APIError, match="this prompt failed"):  # a ValueError from the engine is a 400
            await asyncio.wait_for(streams.consume_all(started, timings), 10)
        assert sorted(closed) == ["a", "c"]

    asyncio.run(main())
