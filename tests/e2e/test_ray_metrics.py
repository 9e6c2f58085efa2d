"""kiln's metrics reach Ray's Prometheus: after a few streamed chats and a training job, the
metrics endpoints Ray lists for Prometheus (its service-discovery file, in the cluster's
session dir) export `ray_kiln_*` request, token and KV series with non-zero values, labelled
with the Serve application and the deployment that recorded them (ray.serve.metrics), and the
trainer's job counter, which the trainer (a plain actor, not a Serve replica) records through
ray.util.metrics, without Serve's labels."""

import time

import pytest

from tests.e2e.ray_session import scrape
from tests.e2e.test_faults import train, wait_job

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

CHATS = 3
EXPORT_TIMEOUT_S = 60.0  # Ray's workers report to the exporter every few seconds
INGRESS = {"application": "kiln", "deployment": "KilnIngress"}
ENGINE = {"application": "kiln", "deployment": "KilnEngine"}

# series -> (labels it must carry, the smallest total that shows it counted what we sent)
WANTED = {
    "ray_kiln_requests_total": ({**INGRESS, "route": "/v1/chat/completions", "status": "200"}, CHATS),
    "ray_kiln_prompt_tokens_total": (INGRESS, CHATS),
    "ray_kiln_generation_tokens_total": (INGRESS, CHATS),
    "ray_kiln_time_to_first_token_seconds_count": (INGRESS, CHATS),
    "ray_kiln_kv_blocks_total": (ENGINE, 1),
    "ray_kiln_batch_tokens_count": (ENGINE, 1),
    "ray_kiln_training_jobs_total": ({"job_type": "sft", "state": "completed"}, 1),
}


def totals(samples) -> dict[str, float]:
    """WANTED series -> the sum of its samples whose labels include the wanted ones."""
    return {name: sum(v for n, have, v in samples if n == name and labels.items() <= have.items())
            for name, (labels, _) in WANTED.items()}


def test_kiln_series_reach_rays_prometheus_endpoint(instance, client, model_id):
    job = train(instance.base, "metered", steps=1)
    for i in range(CHATS):
        stream = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": f"Say {i}."}],
                                                max_tokens=8, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert wait_job(instance.base, job)["state"] == "completed"
    started = time.monotonic()
    while True:
        targets = scrape(instance.ray_dir)
        samples = [sample for exported in targets.values() for sample in exported]
        found = totals(samples)
        short = {name: value for name, value in found.items() if value < WANTED[name][1]}
        if not short:
            break
        exported = sorted({n for n, _, _ in samples if "kiln" in n})
        assert time.monotonic() - started < EXPORT_TIMEOUT_S, f"still short: {short}; {list(targets)} export {exported}"
        time.sleep(1.0)
    print(f"\nRay's Prometheus targets {list(targets)}, {time.monotonic() - started:.1f} s after the chats and "
          f"the job: {found}")
    serve_labels = {"application", "deployment", "replica"}
    trainer_series = [labels for n, labels, _ in samples if n == "ray_kiln_training_jobs_total"]
    assert trainer_series and not any(serve_labels & labels.keys() for labels in trainer_series)
