"""AsyncLLMEngine: the step loop on its own thread, streamed to asyncio consumers."""

import asyncio

import pytest
import torch

from kiln_ray.config import EngineConfig
from kiln_ray.engine.async_engine import AsyncLLMEngine, EngineDeadError, GenerateRequest, RequestStream
from kiln_ray.engine.engine import EngineFullError, LLMEngine
from kiln_ray.engine.sampling_params import SamplingParams
from kiln_ray.model.loader import load_model


@pytest.fixture()
def engine(tiny_model_dirs):
    model = load_model(tiny_model_dirs["llama"][0], torch.float32, "cpu")
    eng = AsyncLLMEngine(LLMEngine(model, EngineConfig(block_size=4, num_kv_blocks=256, max_waiting_requests=64)))
    yield eng
    eng.shutdown()


def req(rid, n_tokens=8, **kw):
    return GenerateRequest(rid, [5, 6, 7, 8, 9], SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True, **kw))


async def collect(engine, request):
    tokens: dict[int, list[int]] = {}
    finish = {}
    async for batch in engine.generate(request):
        for o in batch:
            tokens.setdefault(o.index, []).extend(o.new_token_ids)
            if o.finished:
                finish[o.index] = o.finish_reason
    return tokens, finish


async def wait_idle(engine):
    for _ in range(200):
        s = engine.stats()
        if s.running == s.waiting == s.kv_blocks_used == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(engine.stats())


def test_concurrent_streams_are_batched_and_complete(engine):
    async def main():
        results = await asyncio.gather(*(collect(engine, req(f"r{i}", 12)) for i in range(8)))
        await wait_idle(engine)
        return results

    results = asyncio.run(main())
    for tokens, finish in results:
        assert len(tokens[0]) == 12 and finish == {0: "length"}
    assert len({tuple(t[0]) for t, _ in results}) == 1  # same prompt, greedy
    assert engine.stats().steps < 8 * 12  # they shared steps


def test_leaving_early_aborts_and_frees_blocks(engine):
    async def main():
        stream = engine.generate(req("early", 200))
        async for _ in stream:
            break
        steps_at_exit = engine.stats().steps
        await stream.aclose()
        await wait_idle(engine)
        return steps_at_exit

    steps_at_exit = asyncio.run(main())
    assert "early" not in engine.engine.requests
    assert engine.stats().steps - steps_at_exit < 20  # aborted, not run to its 200 tokens


def test_cancelled_consumer_aborts(engine):
    async def main():
        task = asyncio.create_task(collect(engine, req("cancel-me", 400)))  # 5 + 400 < 512 positions
        for _ in range(1000):  # until it is running
            if engine.stats().steps >= 3:
                break
            await asyncio.sleep(0.005)
        task.cancel()
        steps_at_cancel = engine.stats().steps
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_idle(engine)
        return steps_at_cancel

    steps_at_cancel = asyncio.run(main())
    assert engine.stats().steps - steps_at_cancel < 20  # aborted, not run to its 400 tokens


def test_refusals_raise_before_the_first_batch(engine):
    async def main():
        with pytest.raises(ValueError, match="context limit"):
            await collect(engine, GenerateRequest("long", [5] * 10, SamplingParams(max_tokens=10**6)))
        with pytest.raises(ValueError, match="empty"):
            await collect(engine, GenerateRequest("empty", [], SamplingParams()))

    asyncio.run(main())


def test_full_queue_raises_engine_full(tiny_model_dirs):
    model = load_model(tiny_model_dirs["llama"][0], torch.float32, "cpu")
    config = EngineConfig(block_size=4, num_kv_blocks=64, max_num_seqs=1, max_waiting_requests=0, max_model_len=256)
    eng = AsyncLLMEngine(LLMEngine(model, config))

    async def main():
        first = eng.generate(req("first", 200))
        await first.__anext__()  # running: it holds the only slot for ~200 more steps
        with pytest.raises(EngineFullError):
            await collect(eng, req("second"))
        await first.aclose()

    try:
        asyncio.run(main())
    finally:
        eng.shutdown()


def test_a_failing_step_kills_the_loop_and_fails_every_stream(engine, monkeypatch):
    def broken_step():
        raise RuntimeError("simulated kernel fault")

    async def main():
        task = asyncio.create_task(collect(engine, req("victim", 400)))
        await asyncio.sleep(0.1)
        monkeypatch.setattr(engine.engine, "step", broken_step)
        with pytest.raises(EngineDeadError, match="simulated kernel fault"):
            await task
        assert not engine.is_alive()
        with pytest.raises(EngineDeadError):
            await collect(engine, req("after"))

    asyncio.run(main())


def test_health_reports_a_hung_step_and_a_dead_loop(engine, monkeypatch):
    """What KilnEngine.check_health raises on, so Serve restarts the replica."""
    import threading
    import types

    from actors.engine_actor import KilnEngine

    release, step = threading.Event(), engine.engine.step
    monkeypatch.setattr(engine.engine, "step", lambda: (release.wait(30), step())[1])
    replica = types.SimpleNamespace(engine=engine)

    async def main():
        task = asyncio.create_task(collect(engine, req("stuck", 4)))
        await asyncio.sleep(0.3)
        assert engine.health_problem(stall_after_s=60) is None  # running a step, not for long
        assert "hung" in engine.health_problem(stall_after_s=0.1)
        monkeypatch.setattr("actors.engine_actor.STEP_STALL_S", 0.1)
        with pytest.raises(RuntimeError, match="hung"):
            KilnEngine.func_or_class.check_health(replica)
        release.set()
        await task
        assert engine.health_problem(stall_after_s=0.1) is None  # between steps again
        KilnEngine.func_or_class.check_health(replica)
        monkeypatch.setattr(engine.engine, "step", lambda: 1 / 0)
        with pytest.raises(EngineDeadError):
            await collect(engine, req("fatal", 4))
        with pytest.raises(RuntimeError, match="dead"):
            KilnEngine.func_or_class.check_health(replica)

    asyncio.run(main())


def test_a_consumer_whose_event_loop_closed_does_not_kill_the_loop(engine):
    """A caller's event loop that dies mid-request (no abort sent) must not take the engine
    thread down: the request is aborted and others keep being served."""

    loop = asyncio.new_event_loop()
    orphan = engine.generate(req("orphan", 300))
    loop.run_until_complete(orphan.__anext__())  # running now
    loop.close()  # closed without finalising the generator: no abort is ever sent

    async def main():
        tokens, _ = await asyncio.wait_for(collect(engine, req("next", 5)), 30)
        await wait_idle(engine)
        return tokens

    assert len(asyncio.run(main())[0]) == 5
    assert engine.is_alive()
    del orphan


def test_outputs_and_a_failure_arriving_together_give_the_outputs_then_the_failure():
    from kiln_ray.engine.async_engine import RequestStream
    from kiln_ray.engine.request import RequestOutput

    async def main():
        stream = RequestStream(asyncio.get_running_loop(), 1)
        stream.put([RequestOutput("r", 0, [7])])
        stream.fail(EngineDeadError("gone"))  # both before the consumer wakes
        first = await asyncio.wait_for(stream.next_batch(), 1)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(stream.next_batch(), 1)  # raises at once, never waits
        return first

    assert asyncio.run(main())[0].new_token_ids == [7]


def test_a_shared_sink_gets_one_put_per_step_with_every_request_in_it(engine):
    """What a subscription relies on: the loop thread hands a sink all of its requests'
    increments of a step at once, not one call per request."""

    class Sink:
        def __init__(self, loop):
            self.loop = loop
            self.puts: list[set[str]] = []
            self.finished = 0

        def put(self, outputs):
            self.puts.append({o.request_id for o in outputs})
            self.finished += sum(o.finished for o in outputs)

        def fail(self, error):
            raise AssertionError(error)

    async def main():
        sink = Sink(asyncio.get_running_loop())
        await asyncio.gather(*(engine.add(req(f"s{i}", 6), sink) for i in range(4)))
        for _ in range(500):
            if sink.finished == 4:
                break
            await asyncio.sleep(0.01)
        await wait_idle(engine)
        return sink

    sink = asyncio.run(main())
    assert sink.finished == 4
    assert max(len(p) for p in sink.puts) == 4  # steps that ran all four came as one put each
    assert len(sink.puts) <= 6 + 3  # ~one put per step (the adds may land in different steps)


def test_a_refused_add_raises_and_is_never_added(engine):
    async def main():
        sink = RequestStream(asyncio.get_running_loop(), 1)
        with pytest.raises(ValueError):
            await engine.add(GenerateRequest("bad", [], SamplingParams(max_tokens=4)), sink)
        return engine.stats()

    assert asyncio.run(main()).waiting == 0
    assert "bad" not in engine.engine.requests


def test_a_consumer_slower_than_the_engine_still_gets_every_token(engine):
    """The engine may finish a request while its consumer is still busy with an earlier batch:
    the outputs delivered meanwhile (the final one included) are handed out, not dropped."""

    async def main():
        tokens = []
        async for batch in engine.generate(req("slow", 6)):
            tokens += [t for o in batch for t in o.new_token_ids]
            await wait_idle(engine)  # busy until the engine has finished the whole request
        return tokens

    assert len(asyncio.run(main())) == 6


def test_load_adapter_copies_while_the_loop_steps_then_flips(tiny_model_dirs, monkeypatch):
    """The hot swap through the loop: while the copy into the reserved slot is held back, the
    loop keeps stepping a stream that was admitted before the swap; that stream yields only
    the old version's tokens, and a request after `load_adapter` returns gets the new one."""
    import threading

    from tests.engine.test_adapters import random_adapter

    model = load_model(tiny_model_dirs["llama"][0], torch.float32, "cpu")
    eng = AsyncLLMEngine(LLMEngine(model, EngineConfig(block_size=4, num_kv_blocks=256, max_loras=2, max_lora_rank=8)))
    v1, v2 = random_adapter(model, 1), random_adapter(model, 2)
    copy_started, release = threading.Event(), threading.Event()
    fill = eng.engine.fill_adapter_slot

    def held_back_fill(*args):
        copy_started.set()
        assert release.wait(30)
        fill(*args)

    def on(adapter, rid, n=300):  # long enough to outlast the swap
        return GenerateRequest(rid, [5, 6, 7, 8, 9], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), adapter)

    async def main():
        await eng.load_adapter("x", 2, v2)
        new = (await collect(eng, on("x", "new")))[0][0]
        await eng.load_adapter("x", 1, v1)
        old = (await collect(eng, on("x", "old")))[0][0]
        assert old != new
        monkeypatch.setattr(eng.engine, "fill_adapter_slot", held_back_fill)
        before = asyncio.create_task(collect(eng, on("x", "before")))
        while eng.stats().running == 0:
            await asyncio.sleep(0.005)
        swap = asyncio.create_task(eng.load_adapter("x", 2, v2))
        assert await asyncio.to_thread(copy_started.wait, 30)
        steps = eng.stats().steps
        for _ in range(1000):  # the loop is not waiting for the copy
            if eng.stats().steps >= steps + 3:
                break
            await asyncio.sleep(0.01)
        assert eng.stats().steps >= steps + 3 and eng.engine.adapters.current["x"] == 1
        release.set()
        await swap
        after = (await collect(eng, on("x", "after")))[0][0]
        return old, new, (await before)[0][0], after

    try:
        old, new, before, after = asyncio.run(main())
    finally:
        release.set()
        eng.shutdown()
    assert before == old and after == new


def test_the_step_thread_flushes_denormals_whichever_thread_built_the_engine(tiny_model_dirs):
    """The flag is per thread: an engine built on a thread that has ended (as in the Serve
    replica, kiln_ray/engine/own_thread.py) still steps with denormals flushed."""
    from kiln_ray.engine.own_thread import run_in_own_thread

    def build():
        torch.set_flush_denormal(True)  # what LLMEngine.from_config does, on the building thread
        model = load_model(tiny_model_dirs["llama"][0], torch.float32, "cpu")
        return LLMEngine(model, EngineConfig(block_size=4, num_kv_blocks=64))

    eng = AsyncLLMEngine(run_in_own_thread(build))
    try:
        tiny = asyncio.run(eng.call(lambda _: (torch.tensor([1e-39]) * 1.0).item()))
    finally:
        eng.shutdown()
    assert tiny == 0.0
