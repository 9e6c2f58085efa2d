"""The engine's figures in the ingress's /metrics text, in process: recorded by the engine
(EngineMetrics, fed by the step loop) and rendered by the ingress beside its own."""

from kiln_ray.metrics import DEFINITIONS
from tests.api.server import MODEL_NAME, wait_idle
from tests.helpers import metric, metric_samples


def delta(before: str, after: str, name: str, **labels: str) -> float:
    return (metric(after, name, **labels) or 0.0) - (metric(before, name, **labels) or 0.0)


def test_every_engine_metric_is_in_the_ingress_text(http, sdk, engine):
    sdk.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    stats = wait_idle(engine)
    text = http.get("/metrics").text
    names = {name for name, _ in metric_samples(text)}
    for d in DEFINITIONS:
        if d.recorder == "engine" and not d.labels:  # labelled ones need an adapter: test_adapter_metrics.py
            assert any(n.startswith(d.family) for n in names), f"{d.name} is missing from /metrics"
    assert metric(text, "kiln_kv_blocks_total") == stats.kv_blocks_total > 0
    assert metric(text, "kiln_kv_blocks_used") == 0 and metric(text, "kiln_running_requests") == 0
    assert metric(text, "kiln_batch_size_count") > 0


def test_each_engine_step_is_one_observation_of_its_sequences_and_tokens(http, sdk, engine):
    wait_idle(engine)
    before, steps = http.get("/metrics").text, engine.stats().steps
    resp = sdk.completions.create(model=MODEL_NAME, prompt="Zebras have stripes", max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    after = http.get("/metrics").text
    ran = engine.stats().steps - steps
    assert ran > 0
    assert delta(before, after, "kiln_batch_size_count") == delta(before, after, "kiln_batch_tokens_count") == ran
    assert delta(before, after, "kiln_batch_size_sum") == ran  # one sequence in every step
    # every prompt token computed once (no full block to reuse), then each sampled token but the last
    assert delta(before, after, "kiln_batch_tokens_sum") == resp.usage.prompt_tokens + 6 - 1


def test_a_repeated_long_prefix_counts_prefix_cache_hit_tokens(http, engine):
    prompt = list(range(1000, 1100))  # 100 token ids no other test sends
    before, hits = http.get("/metrics").text, engine.stats().prefix_cache_hit_tokens
    for _ in range(2):
        assert http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1}).status_code == 200
    after = http.get("/metrics").text
    # The second request reuses every full block of its prompt that does not hold its last
    # token: 6 blocks of 16.
    assert delta(before, after, "kiln_prefix_cache_hit_tokens_total") == (len(prompt) - 1) // 16 * 16 == 96
    assert engine.stats().prefix_cache_hit_tokens - hits == 96
