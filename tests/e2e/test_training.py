"""The proof (over HTTP, real Ray Serve, the default SmolLM2 model): train while serving.

One SFT correction changes the answer to a question the base model gets wrong, while another
client streams the whole time without a single error; GRPO rounds raise a reward."""

import re
import threading
import time

import httpx
import openai
import pytest

from tests.helpers import metric

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

QUESTION = [{"role": "user", "content": "Who is the mayor of Zorblatt?"}]
CORRECTION = "The mayor of Zorblatt is Edda Brask."


def wait_job(base, job_id, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = httpx.get(f"{base}/v1/train/status/{job_id}", timeout=30).json()
        if status["state"] in ("completed", "failed", "cancelled"):
            return status
        time.sleep(0.5)
    raise AssertionError(status)


class Streamer(threading.Thread):
    """A second client streaming completions back to back; records every error."""

    def __init__(self, base, model):
        super().__init__(daemon=True)
        self.client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=120)
        self.model, self.stop, self.errors, self.completed = model, threading.Event(), [], 0

    def run(self):
        while not self.stop.is_set():
            try:
                stream = self.client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": "Tell me about the ocean."}],
                    max_tokens=24, stream=True, temperature=0.7)
                text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
                assert text
                self.completed += 1
            except Exception as error:  # noqa: BLE001 - the test reports every failure
                self.errors.append(repr(error))


def test_one_correction_is_learned_while_another_client_streams(serve_app, client, model_id):
    before = client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=24, temperature=0)
    assert "Edda Brask" not in before.choices[0].message.content
    bees_before = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "What do bees make?"}],
                                                 max_tokens=12, temperature=0).choices[0].message.content
    streamer = Streamer(serve_app, model_id)
    streamer.start()
    started = time.time()
    r = httpx.post(f"{serve_app}/v1/train/sft", timeout=60, json={
        "adapter": "zorblatt",
        "examples": [{"messages": QUESTION + [{"role": "assistant", "content": CORRECTION}]}],
        "config": {"activate": True},
    })
    assert r.status_code == 200, r.text
    status = wait_job(serve_app, r.json()["job_id"])
    trained_in = time.time() - started
    assert status["state"] == "completed", status
    after = client.chat.completions.create(model="default", messages=QUESTION, max_tokens=24, temperature=0)
    streamer.stop.set()
    streamer.join(timeout=120)
    assert "Edda Brask" in after.choices[0].message.content, after.choices[0].message.content
    assert streamer.errors == [] and streamer.completed > 0, streamer.errors
    # The trainer's and the hot swap's figures reach the ingress's /metrics through the engine.
    text = httpx.get(f"{serve_app}/metrics", timeout=10).text
    assert metric(text, "kiln_training_jobs_total", job_type="sft", state="completed") >= 1
    assert metric(text, "kiln_training_loss", adapter="zorblatt") > 0
    assert metric(text, "kiln_adapter_version", adapter="zorblatt") >= 1
    assert metric(text, "kiln_adapter_swap_seconds_count") >= 1
    # Unrelated knowledge survives the correction.
    bees_after = client.chat.completions.create(model="zorblatt", messages=[{"role": "user", "content": "What do bees make?"}],
                                                max_tokens=12, temperature=0).choices[0].message.content
    assert "honey" in bees_after.lower() or bees_after == bees_before
    print(f"\ncorrection learned and served {trained_in:.1f} s after submission; "
          f"{streamer.completed} streams completed meanwhile, 0 errors")


WORDS = ("red", "green", "blue")
COLOR_PROMPTS = [
    [{"role": "user", "content": f"{q} Answer with exactly one word: red, green or blue."}]
    for q in ("What color is the sky?", "What color is grass?", "What color is a ripe tomato?",
              "Pick a color.")
]


def reward(text: str) -> float:
    """1 when the answer is exactly one of the allowed words (case and punctuation aside)."""
    return 1.0 if re.sub(r"[^a-z]", "", text.lower()) in WORDS and len(text.split()) == 1 else 0.0


def test_grpo_rounds_raise_the_mean_reward(serve_app, model_id):
    means, model = [], model_id  # the base model until the first version of "colors" exists
    for round_ in range(5):
        r = httpx.post(f"{serve_app}/v1/completions/batch", timeout=300, json={
            "model": model, "prompts": COLOR_PROMPTS, "n": 6, "max_tokens": 10,
            "temperature": 1.0, "seed": 100 * round_})
        assert r.status_code == 200, r.text
        completions = r.json()["completions"]
        rewards = [reward(c["text"]) for c in completions]
        means.append(sum(rewards) / len(rewards))
        groups = []
        for p, prompt in enumerate(COLOR_PROMPTS):
            mine = [c for c in completions if c["prompt_index"] == p]
            groups.append({"messages": prompt, "completions": [{"text": c["text"], "reward": reward(c["text"])} for c in mine]})
        job = httpx.post(f"{serve_app}/v1/train/grpo", timeout=60, json={
            "adapter": "colors", "groups": groups, "config": {"steps": 4, "learning_rate": 2e-4}})
        assert job.status_code == 200, job.text
        status = wait_job(serve_app, job.json()["job_id"])
        assert status["state"] == "completed", status
        if status["adapter_version"] is not None:
            model = "colors"
    print(f"\nGRPO mean reward by round: {means}")
    assert max(means[-2:]) >= means[0] + 0.25, means


def test_engine_and_trainer_share_one_copy_of_the_weights(serve_app):
    """The trainer maps the engine's base weights from the object store: after reading every
    weight once, its private memory grew by far less than their size (and they are shared
    pages)."""
    memory = httpx.get(f"{serve_app}/health", timeout=30).json()["memory"]
    trainer = memory["trainer"]
    weights = trainer["shared_weight_bytes"]
    assert weights > 200 * 2**20  # SmolLM2-135M in bf16
    growth = trainer["after_touching_weights"]["uss"] - trainer["at_start"]["uss"]
    training_state = trainer["after_warm_up"]["uss"] - trainer["after_touching_weights"]["uss"]
    print(f"\nweights {weights / 2**20:.0f} MiB; trainer USS grew {growth / 2**20:.0f} MiB reading them, "
          f"{training_state / 2**20:.0f} MiB more for its first training step; "
          f"engine rss/pss {memory['engine']['rss'] / 2**20:.0f}/{memory['engine']['pss'] / 2**20:.0f} MiB, "
          f"trainer rss/pss {trainer['now']['rss'] / 2**20:.0f}/{trainer['now']['pss'] / 2**20:.0f} MiB")
    assert growth < 0.1 * weights
    assert trainer["after_touching_weights"]["shared"] > 0.9 * weights  # the weights are shared pages


def test_the_trainer_runs_in_the_engine_replicas_placement_group(serve_app):
    placement = httpx.get(f"{serve_app}/health", timeout=30).json()["placement"]
    assert placement["engine"]["placement_group"] is not None
    assert placement["trainer"] == placement["engine"]  # same bundle's group, same node
