"""Outbox: one subscriber's outputs from many requests, gathered for one stream."""

import asyncio

import pytest

from kiln_ray.engine.outbox import Outbox
from kiln_ray.engine.request import RequestOutput


def out(request_id, token, finish=None, index=0):
    return RequestOutput(request_id=request_id, index=index, new_token_ids=[token], finish_reason=finish,
                         logprobs=None, num_prompt_tokens=3, num_cached_tokens=0, num_output_tokens=1)


def test_outputs_of_several_steps_and_requests_coalesce_into_one_batch():
    async def main():
        box = Outbox(asyncio.get_running_loop(), "ingress-1")
        box.put([out("a", 1), out("b", 7)])
        box.put([out("a", 2)])
        first = await box.next_batch(timeout=1)
        box.put([out("b", 8, "stop")])
        return first, await box.next_batch(timeout=1)

    first, second = asyncio.run(main())
    assert [(o.request_id, o.new_token_ids) for o in first] == [("a", [1]), ("b", [7]), ("a", [2])]
    assert [(o.request_id, o.finish_reason) for o in second] == [("b", "stop")]


def test_an_idle_outbox_answers_an_empty_heartbeat():
    async def main():
        return await Outbox(asyncio.get_running_loop(), "s").next_batch(timeout=0.01)

    assert asyncio.run(main()) == []


def test_live_requests_are_those_with_unfinished_sequences():
    async def main():
        box = Outbox(asyncio.get_running_loop(), "s")
        box.track("one", 1)
        box.track("pair", 2)  # n = 2: two sequences
        box.track("refused", 1)
        box.untrack("refused")
        box.put([out("one", 1, "length"), out("pair", 5, "stop", index=0)])
        return box.live_requests

    assert asyncio.run(main()) == ["pair"]


def test_a_failure_comes_after_the_outputs_before_it():
    async def main():
        box = Outbox(asyncio.get_running_loop(), "s")
        box.put([out("a", 1)])
        box.fail(RuntimeError("engine loop stopped"))
        batch = await box.next_batch(timeout=1)
        with pytest.raises(RuntimeError, match="engine loop stopped"):
            await box.next_batch(timeout=1)
        return batch

    assert [o.new_token_ids for o in asyncio.run(main())] == [[1]]
