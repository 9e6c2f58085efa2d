"""API keys: which routes need which key, 401/403 with OpenAI-style bodies, the admin key's
fallback, the openai SDK with a key, constant-time comparison, and keys never logged."""

import hmac
import logging

import openai
import pytest
from fastapi.testclient import TestClient

from kiln_ray.api import auth
from kiln_ray.api.auth import Access, KeyCheck, required_access
from kiln_ray.api.errors import APIError
from kiln_ray.config import KilnConfig
from tests.api.server import make_app

USER, ADMIN = "user-key-0123456789", "admin-key-9876543210"
CONV = [{"role": "user", "content": "Who built the Zorblatt tower?"},
        {"role": "assistant", "content": "Edda Brask built it."}]


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(tiny_smol_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    app, engine = make_app(tiny_smol_dir, home=home, server={"api_key": USER, "admin_key": ADMIN})
    with TestClient(app) as client:
        yield client
    engine.service.stop()
    engine.shutdown()


@pytest.mark.parametrize("method,path,access", [
    ("GET", "/health", Access.OPEN),
    ("GET", "/ui", Access.OPEN),
    ("GET", "/metrics", Access.OPEN),
    ("GET", "/v1/models", Access.USER),
    ("POST", "/v1/chat/completions", Access.USER),
    ("POST", "/v1/completions/batch", Access.USER),
    ("GET", "/v1/no-such-route", Access.USER),
    ("GET", "/no-such-route", Access.USER),  # closed unless listed open
    ("GET", "//v1/train/status", Access.USER),
    ("GET", "/ui/app.js", Access.OPEN),
    ("GET", "/docs", Access.OPEN),
    ("GET", "/openapi.json", Access.OPEN),
    ("GET", "/v1/adapters", Access.USER),
    ("GET", "/v1/adapters/", Access.USER),
    ("GET", "/v1/adapters/x/download", Access.ADMIN),
    ("POST", "/v1/adapters/load", Access.ADMIN),
    ("DELETE", "/v1/adapters/x", Access.ADMIN),
    ("POST", "/v1/adapters/upload", Access.ADMIN),
    ("GET", "/v1/train/status", Access.ADMIN),
    ("POST", "/v1/train/sft", Access.ADMIN),
    ("DELETE", "/v1/train/queue/abc", Access.ADMIN),
])
def test_required_access(method, path, access):
    assert required_access(method, path) is access


def test_metrics_can_require_the_key():
    assert required_access("GET", "/metrics", metrics_require_key=True) is Access.USER


@pytest.fixture(scope="module")
def metrics_keyed(tiny_smol_dir):
    """A server with `metrics_require_key: true` (no trainer: /metrics needs none)."""
    app, engine = make_app(tiny_smol_dir, server={"api_key": USER, "admin_key": ADMIN, "metrics_require_key": True})
    with TestClient(app) as client:
        yield client
    engine.shutdown()


def test_metrics_behind_the_key_answer_401_without_it_and_200_with_it(metrics_keyed):
    refused = metrics_keyed.get("/metrics")
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert refused.json()["error"]["code"] == "missing_api_key" and "kiln_" not in refused.text
    assert metrics_keyed.get("/metrics", headers=bearer("nope")).json()["error"]["code"] == "invalid_api_key"
    for key in (USER, ADMIN):  # the admin key opens every user route too
        served = metrics_keyed.get("/metrics", headers=bearer(key))
        assert served.status_code == 200 and "kiln_requests_total" in served.text
    assert metrics_keyed.get("/health").status_code == 200  # probes stay open


def test_no_key_is_a_401_with_an_openai_body(keyed):
    r = keyed.get("/v1/models")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    error = r.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == "missing_api_key"


def test_a_wrong_key_is_a_401(keyed):
    r = keyed.get("/v1/models", headers=bearer("nope"))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    # unknown routes under /v1 are refused before routing: no probing the route table
    assert keyed.get("/v1/no-such-route").status_code == 401


def test_keys_hold_under_a_route_prefix(keyed):
    """Ray Serve mounts the app at its route_prefix as ASGI root_path, and the path keeps the
    prefix: the check classifies the path the app routes by, not the raw one."""
    prefixed = TestClient(keyed.app, root_path="/kiln")
    assert prefixed.get("/kiln/v1/models").status_code == 401
    assert prefixed.get("/kiln/v1/train/status", headers=bearer(USER)).status_code == 403
    assert prefixed.get("/kiln/v1/train/status", headers=bearer(ADMIN)).status_code == 200
    assert prefixed.get("/kiln/v1/models", headers=bearer(USER)).status_code == 200
    assert prefixed.get("/kiln/health").status_code == 200


@pytest.mark.parametrize("path,root,routed", [
    ("/kiln/v1/train/sft", "/kiln", "/v1/train/sft"), ("/kiln", "/kiln", "/"), ("/v1/models", "", "/v1/models"),
    ("/kilnx/v1/train/sft", "/kiln", "/kilnx/v1/train/sft"), ("/v1/models", "/kiln", "/v1/models"),
    ("/kiln/v1/models", "/kiln/", "/kiln/v1/models"), ("//v1/train/status", "/", "/v1/train/status"),
    ("/kiln//v1/models", "/kiln/", "/v1/models"),
])
def test_route_path_strips_the_root_path_at_a_segment(path, root, routed):
    assert auth.route_path({"path": path, "root_path": root}) == routed


def test_open_routes_stay_open(keyed):
    assert keyed.get("/health").status_code == 200
    assert keyed.get("/metrics").status_code == 200


def test_the_api_key_serves_but_does_not_train(keyed):
    assert keyed.get("/v1/models", headers=bearer(USER)).status_code == 200
    assert keyed.get("/v1/models", headers={"x-api-key": USER}).status_code == 200
    assert keyed.get("/v1/adapters", headers=bearer(USER)).status_code == 200
    body = {"adapter": "fix", "examples": [{"messages": CONV}], "config": {"steps": 1}}
    r = keyed.post("/v1/train/sft", json=body, headers=bearer(USER))
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_permissions"
    assert keyed.get("/v1/train/status", headers=bearer(USER)).status_code == 403
    assert keyed.post("/v1/adapters/unload", json={"name": "fix"}, headers=bearer(USER)).status_code == 403


def test_the_admin_key_opens_everything(keyed):
    assert keyed.get("/v1/models", headers=bearer(ADMIN)).status_code == 200
    body = {"adapter": "fix", "examples": [{"messages": CONV}], "config": {"steps": 1, "early_stop_loss": None}}
    r = keyed.post("/v1/train/sft", json=body, headers=bearer(ADMIN))
    assert r.status_code == 200, r.text
    assert keyed.get(f"/v1/train/status/{r.json()['job_id']}", headers=bearer(ADMIN)).status_code == 200


def test_the_openai_sdk_with_a_key(keyed):
    good = openai.OpenAI(base_url="http://testserver/v1", api_key=USER, http_client=keyed, max_retries=0)
    reply = good.chat.completions.create(model="tiny-smol", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert reply.usage.completion_tokens > 0
    bad = openai.OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=keyed, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_the_admin_key_falls_back_to_the_api_key():
    keys = KeyCheck(USER, None)
    keys.check(Access.ADMIN, USER)
    with pytest.raises(APIError) as refused:
        keys.check(Access.ADMIN, "other")
    assert refused.value.status == 401


def test_only_an_admin_key_leaves_serving_open():
    keys = KeyCheck(None, ADMIN)
    keys.check(Access.USER, None)
    keys.check(Access.ADMIN, ADMIN)
    with pytest.raises(APIError):
        keys.check(Access.ADMIN, None)


def test_no_keys_no_checks():
    keys = KeyCheck(None, "")
    assert not keys.enabled
    keys.check(Access.ADMIN, None)


def test_every_configured_key_is_compared_in_constant_time(monkeypatch):
    """Both keys are compared with hmac.compare_digest whichever matches, so the time taken
    does not tell a user key from an admin key."""
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    for presented in (ADMIN, USER, "wrong"):
        calls.clear()
        try:
            KeyCheck(USER, ADMIN).check(Access.USER, presented)
        except APIError:
            pass
        assert len(calls) == 2


def test_keys_come_from_the_environment_and_are_never_shown(caplog):
    config = KilnConfig.from_args({}, env={"KILN_API_KEY": USER, "KILN_ADMIN_KEY": ADMIN})
    assert config.api_key.get_secret_value() == USER and config.admin_key.get_secret_value() == ADMIN
    shown = repr(config) + str(config) + config.model_dump_json()
    assert USER not in shown and ADMIN not in shown
    # the Serve app passes the config to its replicas as model_dump(): the keys must survive it
    again = KilnConfig.model_validate(config.model_dump())
    assert again.api_key.get_secret_value() == USER


def test_keys_are_never_logged(keyed, caplog):
    with caplog.at_level(logging.DEBUG):
        keyed.get("/v1/models", headers=bearer("a-wrong-key-xyz"))
        keyed.get("/v1/models", headers=bearer(USER))
    assert "a-wrong-key-xyz" not in caplog.text and USER not in caplog.text
