"""Link: the ingress side of one engine replica's subscription, demultiplexed to requests."""

import asyncio

import pytest

from kiln_ray.api.demux import Link
from kiln_ray.engine.async_engine import EngineDeadError, RequestStream
from kiln_ray.engine.request import RequestOutput


def out(request_id, token, finish=None):
    return RequestOutput(request_id=request_id, index=0, new_token_ids=[token], finish_reason=finish,
                         logprobs=None, num_prompt_tokens=3, num_cached_tokens=0, num_output_tokens=1)


async def feed(batches, gate: asyncio.Event | None = None, error: BaseException | None = None):
    for batch in batches:
        yield batch
    if gate is not None:
        await gate.wait()
    if error is not None:
        raise error


def two_member_link() -> tuple[dict[str, RequestStream], Link]:
    """A link with requests "a" and "b" joined (inside a running event loop)."""
    loop = asyncio.get_running_loop()
    streams = {"a": RequestStream(loop, 1), "b": RequestStream(loop, 1)}
    link = Link("r1", streams, abort=lambda rid: None)
    link.join("a")
    link.join("b")
    return streams, link


def test_each_request_gets_its_own_outputs_in_order():
    async def main():
        streams, link = two_member_link()
        await link.run(feed([[out("a", 1), out("b", 7)], [out("a", 2), out("b", 8, "stop")], [out("a", 3, "length")]]))
        return [[o.new_token_ids[0] for o in await s.next_batch()] for s in streams.values()], streams

    tokens, streams = asyncio.run(main())
    assert tokens == [[1, 2, 3], [7, 8]]
    assert all(s.done for s in streams.values())


def test_outputs_that_overtake_the_submit_reply_are_kept_for_the_request():
    """The stream exists before the submit; the request joins its link only when the reply
    arrives, after its first outputs did."""

    async def main():
        streams = {"early": RequestStream(asyncio.get_running_loop(), 1)}
        link = Link("r1", streams, abort=lambda rid: None)
        link.deliver([out("early", 4)])
        link.join("early")
        link.deliver([out("early", 5, "stop")])
        return [o.new_token_ids[0] for o in await streams["early"].next_batch()]

    assert asyncio.run(main()) == [4, 5]


def test_a_request_nobody_reads_is_aborted_once():
    aborted = []

    async def main():
        link = Link("r1", {}, abort=aborted.append)
        link.deliver([out("gone", 1)])
        link.deliver([out("gone", 2)])
        link.deliver([out("finished-anyway", 3, "stop")])

    asyncio.run(main())
    assert aborted == ["gone"]


@pytest.mark.parametrize("ending", ["closed", "failed"])
def test_when_the_subscription_ends_every_member_fails_and_the_link_is_dead(ending):
    async def main():
        streams, link = two_member_link()
        error = ConnectionError("replica died") if ending == "failed" else None
        await link.run(feed([[out("a", 1)]], error=error))
        got = await streams["a"].next_batch()
        with pytest.raises(EngineDeadError):
            await streams["a"].next_batch()
        with pytest.raises(EngineDeadError):
            await streams["b"].next_batch()
        with pytest.raises(EngineDeadError):
            link.join("c")  # a request told to use this replica after it died fails at once
        return got, link.alive

    got, alive = asyncio.run(main())
    assert [o.new_token_ids for o in got] == [[1]] and not alive
