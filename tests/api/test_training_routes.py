"""Training and adapter routes in process (routes + ServingNode + a local trainer on a tiny
random model, no Ray): jobs, versions, the default adapter, rollback, download/upload,
merge, delete, and the errors."""

import io
import json
import re
import tarfile
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kiln_ray.config import EngineConfig
from tests.api.server import MODEL_NAME, make_app, wait_idle

CONV = [{"role": "user", "content": "Who built the Zorblatt tower?"},
        {"role": "assistant", "content": "Edda Brask built it."}]
ASK = [{"role": "user", "content": "Who built the Zorblatt tower?"}]
FAST = {"steps": 4, "learning_rate": 0.01, "early_stop_loss": None}


@pytest.fixture(scope="module")
def app(tiny_smol_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    app, engine = make_app(tiny_smol_dir, home=home, max_loras=3)
    with TestClient(app) as client:
        yield client, engine, home
    engine.service.stop()
    engine.shutdown()


@pytest.fixture(scope="module")
def http(app):
    return app[0]


def wait_job(http, job_id, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = http.get(f"/v1/train/status/{job_id}").json()
        if status["state"] in ("completed", "failed", "cancelled"):
            return status
        time.sleep(0.05)
    raise AssertionError(status)


def answer(http, model=None, **extra):
    body = {"messages": ASK, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **extra}
    if model is not None:
        body["model"] = model
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def train(http, adapter, **config):
    r = http.post("/v1/train/sft", json={"adapter": adapter, "examples": [{"messages": CONV}], "config": {**FAST, **config}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["state"] == "queued" and body["adapter"] == adapter
    return wait_job(http, body["job_id"])


def test_sft_job_creates_a_served_adapter_version(http):
    base = answer(http, MODEL_NAME)
    status = train(http, "tower")
    assert status["state"] == "completed" and status["adapter_version"] == 1
    assert status["job_type"] == "sft" and len(status["losses"]) == 4 and status["progress"] == 1.0
    assert {m["id"] for m in http.get("/v1/models").json()["data"]} >= {MODEL_NAME, "tower"}
    tuned = answer(http, "tower")
    assert tuned != base
    assert answer(http, MODEL_NAME) == base  # the base model is untouched
    assert answer(http, adapter="tower") == tuned  # Kiln's `adapter` field


def test_versions_continue_and_can_be_pinned_and_rolled_back(http):
    first = answer(http, "tower@1")
    status = train(http, "tower")
    assert status["adapter_version"] == 2
    second = answer(http, "tower")
    assert answer(http, "tower@2") == second and answer(http, "tower@1") == first
    listing = {a["name"]: a for a in http.get("/v1/adapters").json()["adapters"]}
    assert listing["tower"]["current_version"] == 2
    assert [v["version"] for v in listing["tower"]["versions"]] == [1, 2]
    r = http.post("/v1/adapters/tower/rollback", json={"version": 1})
    assert r.status_code == 200 and r.json()["current_version"] == 1
    assert answer(http, "tower") == first


def test_activate_makes_the_default_adapter(http):
    base = answer(http, "default")
    status = train(http, "greeter", activate=True)
    assert status["state"] == "completed"
    assert http.get("/v1/adapters").json()["default_adapter"] == "greeter"
    assert answer(http, "default") == answer(http, "greeter") != base
    assert answer(http, MODEL_NAME) == base  # naming the base model still gets the base model


def test_download_then_upload_round_trip(http):
    r = http.get("/v1/adapters/tower/download")
    assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
    names = tarfile.open(fileobj=io.BytesIO(r.content)).getnames()
    assert sorted(names) == ["adapter_config.json", "adapter_model.safetensors"]
    up = http.post("/v1/adapters/upload", files={"file": ("a.tar.gz", r.content, "application/gzip")}, data={"name": "copy"})
    assert up.status_code == 200, up.text
    assert answer(http, "copy") == answer(http, "tower")


def test_uploads_are_checked(http):
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    r = http.post("/v1/adapters/upload", files={"file": ("e.tar.gz", evil.getvalue())}, data={"name": "evil"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_adapter"
    r = http.post("/v1/adapters/upload", files={"file": ("e.tar.gz", b"x")}, data={"name": "../etc"})
    assert r.status_code == 400


def test_merge_and_composition(http):
    r = http.post("/v1/adapters/merge", json={"name": "blend", "method": "concat",
                                              "adapters": [{"name": "tower", "weight": 0.5}, {"name": "greeter", "weight": 0.5}]})
    assert r.status_code == 200, r.text
    merged = answer(http, "blend")
    composed = answer(http, adapters=[{"name": "tower", "scale": 0.5}, {"name": "greeter", "scale": 0.5}])
    assert merged == composed  # concat merge == runtime composition (both exact)


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_a_job_seed_outside_64_bits_is_a_400(http, seed):
    r = http.post("/v1/train/sft", json={"adapter": "seeded", "examples": [{"messages": CONV}],
                                         "config": {**FAST, "seed": seed}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "config.seed", r.text


def test_ranks_the_engine_cannot_serve_are_refused(http):
    """The engine's slots hold rank engine.max_lora_rank (the default here): a job, merge or
    upload above it would store a version no request could be served with."""
    limit = EngineConfig().max_lora_rank
    r = http.post("/v1/train/sft", json={"adapter": "wide", "examples": [{"messages": CONV}],
                                         "config": {**FAST, "lora_rank": limit + 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "config.lora_rank", r.text
    ranks = {"tower": 0, "greeter": 0, "blend": 0}
    for name in ranks:
        ranks[name] = json.loads(tarfile.open(fileobj=io.BytesIO(http.get(f"/v1/adapters/{name}/download").content))
                                 .extractfile("adapter_config.json").read())["r"]
    assert sum(ranks.values()) > limit
    r = http.post("/v1/adapters/merge", json={"name": "wide", "method": "concat",
                                              "adapters": [{"name": n, "weight": 1.0} for n in ranks]})
    assert r.status_code == 400 and "max_lora_rank" in r.json()["error"]["message"], r.text
    assert "wide" not in [a["name"] for a in http.get("/v1/adapters").json()["adapters"]]


@pytest.mark.parametrize("name", ["default", MODEL_NAME], ids=["default", "base-model-name"])
def test_new_adapters_may_not_take_a_name_that_model_cannot_select(http, name):
    """`model: "default"` means the default adapter and the served model name the base model,
    so an adapter under either name could never be selected by `model`."""
    group = {"messages": ASK, "completions": [{"text": "yes", "reward": 1.0}, {"text": "no", "reward": 0.0}]}
    archive = http.get("/v1/adapters/tower/download").content
    refused = {
        "adapter": http.post("/v1/train/sft", json={"adapter": name, "examples": [{"messages": CONV}], "config": FAST}),
        "config.output_name": http.post("/v1/train/sft", json={"examples": [{"messages": CONV}],
                                                               "config": {**FAST, "output_name": name}}),
        "grpo adapter": http.post("/v1/train/grpo", json={"adapter": name, "groups": [group], "config": {"steps": 1}}),
        "upload name": http.post("/v1/adapters/upload", files={"file": ("a.tar.gz", archive, "application/gzip")},
                                 data={"name": name}),
        "merge name": http.post("/v1/adapters/merge", json={"name": name, "adapters": [{"name": "tower"},
                                                                                      {"name": "greeter"}]}),
    }
    for param, r in refused.items():
        assert r.status_code == 400, (param, r.text)
        error = r.json()["error"]
        assert error["param"] == param.split()[-1] and f"{name!r} is reserved" in error["message"], error
    assert name not in {a["name"] for a in http.get("/v1/adapters").json()["adapters"]}


def test_delete_removes_an_adapter(http):
    train(http, "temp")
    assert http.delete("/v1/adapters/temp").status_code == 200
    assert "temp" not in {a["name"] for a in http.get("/v1/adapters").json()["adapters"]}
    r = http.post("/v1/chat/completions", json={"model": "temp", "messages": ASK})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_training_errors(http):
    bad = http.post("/v1/train/sft", json={"examples": [{"messages": ASK + [{"role": "user", "content": "?"}]}]})
    assert bad.status_code == 400 and "examples[0]" in bad.json()["error"]["message"]
    assert http.post("/v1/train/sft", json={"adapter": "a/b", "examples": [{"messages": CONV}]}).status_code == 400
    assert http.get("/v1/train/status/job-nope").status_code == 404
    assert http.post("/v1/chat/completions", json={"model": "nope", "messages": ASK}).status_code == 404
    assert http.post("/v1/chat/completions", json={"model": "tower@99", "messages": ASK}).status_code == 404


def test_cancel_a_running_job(http):
    r = http.post("/v1/train/sft", json={"adapter": "long", "examples": [{"messages": CONV}],
                                         "config": {"steps": 500, "early_stop_loss": None}})
    job_id = r.json()["job_id"]
    deadline = time.time() + 30
    while http.get(f"/v1/train/status/{job_id}").json()["state"] != "running" and time.time() < deadline:
        time.sleep(0.05)
    assert job_id in {j["job_id"] for j in http.get("/v1/train/queue").json()["jobs"]}
    assert http.delete(f"/v1/train/queue/{job_id}").status_code == 200
    assert wait_job(http, job_id)["state"] == "cancelled"
    assert "long" not in {a["name"] for a in http.get("/v1/adapters").json()["adapters"]}


def test_grpo_completions_longer_than_the_context_are_refused(http):
    group = {"messages": ASK, "completions": [{"text": "word " * 3000, "reward": 1.0}, {"text": "x", "reward": 0.0}]}
    r = http.post("/v1/train/grpo", json={"adapter": "rl", "groups": [group]})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]


def test_per_job_webhooks_are_off_unless_allowed(http):
    r = http.post("/v1/train/sft", json={"examples": [{"messages": CONV}], "config": {"webhook_url": "http://169.254.169.254/x"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "config.webhook_url"


def test_grpo_job(http):
    group = {"messages": ASK, "completions": [{"text": "Edda Brask.", "reward": 1.0}, {"text": "No idea.", "reward": 0.0}]}
    r = http.post("/v1/train/grpo", json={"adapter": "rl", "groups": [group, {**group, "completions": [
        {"text": "a", "reward": 0.5}, {"text": "b", "reward": 0.5}]}], "config": {"steps": 2}})
    assert r.status_code == 200, r.text
    status = wait_job(http, r.json()["job_id"])
    assert status["state"] == "completed" and status["adapter_version"] == 1
    assert any("equal rewards" in n for n in status["notes"])


def documented_status_fields() -> set[str]:
    """The fields the README's route table lists for GET /v1/train/status."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `GET /v1/train/status"))
    listed = row.split("|")[2].strip().strip("`")
    return set(re.sub(r" \([^)]*\)", "", listed).split(", "))


def test_job_status_has_the_documented_fields_in_order_of_time(http):
    documented = documented_status_fields()
    assert documented >= {"job_id", "job_type", "state", "progress", "current_loss", "losses", "adapter",
                          "adapter_version", "error", "created_at", "started_at", "finished_at"}
    done = train(http, "timed")
    assert set(done) == documented  # every field the route returns is documented, and only those
    assert done["state"] == "completed" and done["error"] is None and done["adapter_version"] == 1
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    assert len(done["losses"]) == 4 and done["current_loss"] == done["losses"][-1]

    r = http.post("/v1/train/sft", json={"adapter": "diverges", "examples": [{"messages": CONV}],
                                         "config": {**FAST, "lora_alpha": 1e308}})  # fails: its loss is not finite
    assert r.status_code == 200, r.text
    failed = wait_job(http, r.json()["job_id"])
    assert set(failed) == documented
    assert failed["state"] == "failed" and isinstance(failed["error"], str) and failed["error"].strip()
    assert failed["adapter_version"] is None
    assert failed["created_at"] <= failed["started_at"] <= failed["finished_at"]
    jobs = http.get("/v1/train/status").json()["jobs"]
    assert {done["job_id"], failed["job_id"]} <= {j["job_id"] for j in jobs}
    assert all(set(j) == documented for j in jobs)


def test_a_rank_or_alpha_for_a_continued_adapter_must_be_its_own_unless_from_scratch(app):
    http, engine, _ = app
    assert train(http, "shaped", lora_rank=4, lora_alpha=8)["adapter_version"] == 1  # a new adapter takes any
    group = {"messages": ASK, "completions": [{"text": "yes", "reward": 1.0}, {"text": "no", "reward": 0.0}]}
    for field, value in (("lora_rank", 8), ("lora_alpha", 16)):
        sft = http.post("/v1/train/sft", json={"adapter": "shaped", "examples": [{"messages": CONV}],
                                               "config": {**FAST, field: value}})
        grpo = http.post("/v1/train/grpo", json={"adapter": "shaped", "groups": [group],
                                                 "config": {"steps": 1, field: value}})
        for r in (sft, grpo):
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == f"config.{field}" and "from_scratch: true" in error["message"], error
    assert describe(http, "shaped")["current_version"] == 1  # nothing was queued
    assert train(http, "shaped", lora_rank=4, lora_alpha=8.0)["adapter_version"] == 2  # its own values are fine
    assert train(http, "shaped", lora_rank=8, from_scratch=True)["adapter_version"] == 3
    config = engine.service.store.version_config("shaped")
    assert (config["r"], config["lora_alpha"]) == (8, 32)  # the new rank, the server's default alpha


def describe(http, name):
    return {a["name"]: a for a in http.get("/v1/adapters").json()["adapters"]}[name]


def test_load_makes_a_stored_version_resident(http):
    assert http.post("/v1/adapters/unload", json={"name": "tower"}).status_code == 200
    assert describe(http, "tower")["resident_versions"] == []
    current = describe(http, "tower")["current_version"]
    r = http.post("/v1/adapters/load", json={"name": "tower"})
    assert r.status_code == 200, r.text
    assert r.json()["resident_versions"] == [current] and r.json()["serving_version"] == current
    older = next(v["version"] for v in r.json()["versions"] if v["version"] != current)
    r = http.post("/v1/adapters/load", json={"name": "tower", "version": older})
    assert r.status_code == 200 and sorted(r.json()["resident_versions"]) == sorted([current, older])
    assert r.json()["serving_version"] == current  # loading an older version does not serve it by default
    assert answer(http, f"tower@{older}") and answer(http, "tower") == answer(http, f"tower@{current}")


@pytest.mark.parametrize("body,status,code", [
    ({"name": "nope"}, 404, "model_not_found"),
    ({"name": "tower", "version": 99}, 404, "model_not_found"),
    ({"name": "../etc"}, 400, None),
    ({"name": "tower", "version": 0}, 400, None),
    ({}, 400, None),
], ids=["unknown-adapter", "unknown-version", "path-name", "version-0", "no-name"])
def test_load_errors(http, body, status, code):
    r = http.post("/v1/adapters/load", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


def test_kiln_output_name_names_the_adapter_and_the_adapter_field_wins(http):
    def submit(body):
        r = http.post("/v1/train/sft", json={"examples": [{"messages": CONV}], **body})
        assert r.status_code == 200, r.text
        return r.json()

    named = submit({"config": {**FAST, "output_name": "kiln-named"}})
    assert named["adapter"] == "kiln-named"
    assert wait_job(http, named["job_id"])["adapter"] == "kiln-named"
    assert describe(http, "kiln-named")["current_version"] == 1
    both = submit({"adapter": "explicit", "config": {**FAST, "output_name": "ignored"}})
    assert both["adapter"] == "explicit"
    wait_job(http, both["job_id"])
    assert "ignored" not in {a["name"] for a in http.get("/v1/adapters").json()["adapters"]}


def test_a_job_without_a_name_gets_a_generated_one(http):
    r = http.post("/v1/train/sft", json={"examples": [{"messages": CONV}], "config": FAST})
    assert r.status_code == 200, r.text
    name = r.json()["adapter"]
    assert re.fullmatch(r"sft-[0-9a-f]{8}", name)
    assert wait_job(http, r.json()["job_id"])["adapter_version"] == 1
    assert describe(http, name)["current_version"] == 1
    assert answer(http, name)  # served under that name
    group = {"messages": ASK, "completions": [{"text": "yes", "reward": 1.0}, {"text": "no", "reward": 0.0}]}
    r = http.post("/v1/train/grpo", json={"groups": [group], "config": {"steps": 1}})
    assert re.fullmatch(r"grpo-[0-9a-f]{8}", r.json()["adapter"])
    wait_job(http, r.json()["job_id"])


def test_a_full_training_queue_answers_503_with_retry_after(tiny_smol_dir, tmp_path):
    app, engine = make_app(tiny_smol_dir, home=tmp_path, training={"max_queued_jobs": 1}, max_loras=2)
    long = {"examples": [{"messages": CONV}], "config": {"steps": 1000, "early_stop_loss": None}}
    try:
        with TestClient(app) as client:
            running = client.post("/v1/train/sft", json={"adapter": "long", **long}).json()["job_id"]
            deadline = time.time() + 30
            while client.get(f"/v1/train/status/{running}").json()["state"] != "running" and time.time() < deadline:
                time.sleep(0.05)
            queued = client.post("/v1/train/sft", json={"adapter": "next", **long})
            assert queued.status_code == 200 and queued.json()["state"] == "queued"
            refused = client.post("/v1/train/sft", json={"adapter": "third", **long})
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "5"
            error = refused.json()["error"]
            assert error["code"] == "queue_full" and error["type"] == "service_unavailable"
            assert "limit 1" in error["message"]
            for job_id in (queued.json()["job_id"], running):
                client.delete(f"/v1/train/queue/{job_id}")
            assert wait_job(client, running)["state"] == "cancelled"
            again = client.post("/v1/train/sft", json={"adapter": "third", **long})
            assert again.status_code == 200  # room again once the queue drained
            client.delete(f"/v1/train/queue/{again.json()['job_id']}")
            assert wait_job(client, again.json()["job_id"])["state"] == "cancelled"
    finally:
        engine.service.stop()
        engine.shutdown()


def test_nothing_leaks(app):
    _, engine, _ = app
    wait_idle(engine)
    assert all(r["pins"] == 0 for r in engine.engine.adapters.listing())


def test_a_downloaded_adapter_loads_in_peft_and_gives_the_same_logits(app, tiny_smol_dir, tmp_path):
    """The served adapter, exported, is a PEFT adapter: transformers + peft on the same tiny
    model (fp32) greedy-decode the server's tokens, with the server's log-probabilities, and
    over the whole sequence give the logits of our model with the served slot."""
    import peft
    import torch
    import transformers

    from kiln_ray.api.chat import render_chat
    from kiln_ray.model.context import ForwardContext
    from kiln_ray.model.lora import LoraBatch
    from kiln_ray.model.registry import load_tokenizer
    from tests.model.test_causal_lm import rel_max_err

    http, engine, _ = app
    data = http.get("/v1/adapters/tower/download").content
    tarfile.open(fileobj=io.BytesIO(data)).extractall(tmp_path, filter="data")
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_smol_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    tok = load_tokenizer(tiny_smol_dir)
    prompt = render_chat(tok, ASK)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=2)
        sequence = out[0]
        peft_logits = model(sequence[None]).logits[0]  # (T, vocab)
    generated = sequence[len(prompt):]
    served = http.post("/v1/completions", json={"model": "tower", "prompt": prompt, "max_tokens": 8, "temperature": 0,
                                                "min_tokens": 8, "logprobs": 0}).json()["choices"][0]
    assert tok.decode(generated) == served["text"]
    peft_logprobs = peft_logits[len(prompt) - 1:-1].log_softmax(-1).gather(1, generated[:, None])[:, 0]
    assert served["logprobs"]["token_logprobs"] == pytest.approx(peft_logprobs.tolist(), abs=1e-4)

    ours = engine.engine  # idle: nothing steps while this reads the model and the served slot
    lora = LoraBatch(ours.runner.adapter_slots, [(ours.adapters.resolve("tower").slot, None)])
    with torch.no_grad():
        hidden = ours.model(sequence, torch.arange(len(sequence)), ForwardContext.dense([len(sequence)], lora=lora))
        our_logits = ours.model.compute_logits(hidden)
    assert rel_max_err(our_logits, peft_logits) < 1e-4  # max |diff| / std of peft's logits
    with torch.no_grad(), model.disable_adapter():
        assert rel_max_err(peft_logits, model(sequence[None]).logits[0]) > 1e-2  # the adapter matters


def test_a_restarted_server_serves_every_adapter_and_the_default(app, tiny_smol_dir):
    """Nothing is lost: a new engine on the same home loads each adapter's current version
    from the store and restores the default adapter."""
    http, _, home = app
    before = {name: answer(http, name) for name in ("tower", "greeter")}
    default_before = answer(http, "default")
    app2, engine2 = make_app(tiny_smol_dir, home=home, max_loras=3)
    try:
        with TestClient(app2) as http2:
            assert http2.get("/v1/adapters").json()["default_adapter"] == "greeter"
            for name, text in before.items():
                assert answer(http2, name) == text
            assert answer(http2, "default") == default_before
    finally:
        engine2.service.stop()
        engine2.shutdown()
