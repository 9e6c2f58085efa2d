"""k8s/: the KubeRay manifests are what the API server and the operator accept, their serve
config builds the kiln app we mean to run on those pods, and the Grafana dashboard charts every
kiln_* metric under the name Ray exports it by.

The RayService CRD (tests/data/ray.io_rayservices.yaml, copied from KubeRay) is a Kubernetes
structural schema; `_as_json_schema` turns it into plain JSON Schema with the API server's
semantics, so a manifest that validates here is one the API server accepts (CEL rules aside).
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from kiln_ray.config import KilnConfig
from kiln_ray.metrics import DEFINITIONS

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
CRD = Path(__file__).parent / "data" / "ray.io_rayservices.yaml"
MANIFESTS = sorted(K8S.glob("*.yaml"))
GPU_MANIFEST = K8S / "rayservice.yaml"
CPU_MANIFEST = K8S / "rayservice-cpu.yaml"

_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 18k lines


# ---------------------------------------------------------------- the CRD as JSON Schema


def _as_json_schema(node: dict) -> dict:
    """One node of a structural schema as the API server applies it:

    - unknown fields are errors (kubectl's default field validation is Strict; the CRD has no
      x-kubernetes-preserve-unknown-fields, so every object with `properties` is closed);
    - x-kubernetes-int-or-string accepts exactly an integer or a string;
    - int32/int64 formats are range-checked; `nullable` admits null;
    - a required field that has a default counts as present (the server defaults first).

    x-kubernetes-list-map-keys is kept for `_unique_list_map_keys`; CEL rules
    (x-kubernetes-validations, 3 in this CRD, none on fields we set) are not evaluated."""
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if "x-kubernetes-list-map-keys" in node:
        out["x-kubernetes-list-map-keys"] = node["x-kubernetes-list-map-keys"]
    if "properties" in node:
        props = node["properties"]
        out["properties"] = {name: _as_json_schema(s) for name, s in props.items()}
        out["required"] = [r for r in node.get("required", []) if "default" not in props.get(r, {})]
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _as_json_schema(node["additionalProperties"])
    elif "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if "items" in node:
        out["items"] = _as_json_schema(node["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [_as_json_schema(s) for s in node[key]]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("format") in _INT_RANGES:
        out["minimum"], out["maximum"] = _INT_RANGES[node["format"]]
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    return out


def _unique_list_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-type: map: no two items share their key fields (two env vars or
    volumes of one name, two ports on one number and protocol)."""
    if not isinstance(instance, list):
        return
    defaults = schema.get("items", {}).get("properties", {})
    seen = set()
    for item in instance:
        key = tuple(item.get(k, defaults.get(k, {}).get("default")) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate list-map key {dict(zip(keys, key))}")
        seen.add(key)


_Validator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _unique_list_map_keys}
)


@pytest.fixture(scope="module")
def spec_validator():
    crd = yaml.load(CRD.read_text(), Loader=_LOADER)
    assert crd["spec"]["names"]["kind"] == "RayService"
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _as_json_schema(v1["schema"]["openAPIV3Schema"]["properties"]["spec"])
    _Validator.check_schema(schema)
    return _Validator(schema)


def _errors(validator, spec: dict) -> list[str]:
    return [f"spec.{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(spec)]


# ---------------------------------------------------------------- reading the manifests


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_LOADER) if d]


def _rayservice(path: Path) -> dict:
    (service,) = [d for d in _documents(path) if d["kind"] == "RayService"]
    return service


def _groups(service: dict) -> list[tuple[dict, int]]:
    """(group spec, pod count) for the head group and every worker group."""
    cluster = service["spec"]["rayClusterConfig"]
    workers = cluster.get("workerGroupSpecs", [])
    return [(cluster["headGroupSpec"], 1)] + [(g, g.get("replicas", g["minReplicas"])) for g in workers]


def _containers(service: dict) -> list[dict]:
    return [c for group, _ in _groups(service) for c in group["template"]["spec"]["containers"]]


def _quantity(value: str | int) -> float:
    """A Kubernetes CPU/GPU quantity as a number ("8", "500m", 1)."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _ray_resources(group: dict) -> tuple[float, float]:
    """(CPUs, GPUs) Ray advertises for one pod of the group: rayStartParams, else the limits."""
    params = group.get("rayStartParams", {})
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpus = _quantity(params.get("num-cpus", limits["cpu"]))
    gpus = _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    return cpus, gpus


def _serve_config(service: dict) -> dict:
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def _kiln_args(service: dict) -> dict:
    (app,) = _serve_config(service)["applications"]
    return app["args"]


def _kiln_config(service: dict) -> KilnConfig:
    """KilnConfig as the head builds it: the args plus the KILN_* env of its container, secrets
    standing in for secretKeyRefs."""
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value", f"secret-{e['name']}") for e in head.get("env", [])}
    return KilnConfig.from_args(_kiln_args(service), env=env)


def _mounts(group: dict) -> dict[str, dict]:
    """mountPath -> the volume mounted there, for the group's kiln container."""
    spec = group["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    return {m["mountPath"]: volumes[m["name"]] for m in spec["containers"][0].get("volumeMounts", [])}


def _app_deployments(application) -> dict:
    """name -> Deployment of a bound Serve application. Serve has no public walk over an
    unbuilt Application, so this follows its bound deployments' init args."""
    from ray.serve.deployment import Application

    found, todo = {}, [application]
    while todo:
        deployment = todo.pop()._bound_deployment
        found[deployment.name] = deployment
        todo += [a for a in deployment.init_args if isinstance(a, Application)]
    return found


def _build(monkeypatch, service: dict, gpu: bool) -> dict:
    """build_app on the manifest's args as on a cluster with (or without) a GPU, the model
    path taken as given: what Serve would place, without a Ray cluster."""
    import kiln_ray.app as app

    for key in [k for k in os.environ if k.startswith("KILN_")]:
        monkeypatch.delenv(key)
    monkeypatch.setattr(app.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(app.ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 1.0 if gpu else 0.0})
    monkeypatch.setattr(app, "resolve_model_path", lambda model, home: Path(model))
    return _app_deployments(app.build_app(_kiln_args(service)))


# ---------------------------------------------------------------- the CRD


def test_both_manifests_exist():
    assert {GPU_MANIFEST, CPU_MANIFEST} <= set(MANIFESTS)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_the_rayservice_crd(path, spec_validator):
    service = _rayservice(path)
    assert service["apiVersion"] == "ray.io/v1"
    errors = _errors(spec_validator, service["spec"])
    assert not errors, "\n".join(errors)


def _head_container(spec: dict) -> dict:
    return spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _set(spec: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    node = spec
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[last] = value


# name -> (change to a valid spec, what the error must say)
MUTATIONS = {
    "container port as a string": (
        lambda s: _set(_head_container(s)["ports"][0], "containerPort", "6379"), "is not of type 'integer'"),
    "container port beyond int32": (
        lambda s: _set(_head_container(s)["ports"][0], "containerPort", 2**31), "greater than the maximum"),
    "misspelt field": (
        lambda s: _set(s["rayClusterConfig"]["headGroupSpec"], "rayStartParam", {}),
        "'rayStartParam' was unexpected"),
    "unknown field in a pod": (
        lambda s: _set(_head_container(s), "resource", {}), "'resource' was unexpected"),
    "rayStartParams value not a string": (
        lambda s: _set(s["rayClusterConfig"]["headGroupSpec"]["rayStartParams"], "num-gpus", 0),
        "is not of type 'string'"),
    "cpu limit not a quantity": (
        lambda s: _set(_head_container(s)["resources"]["limits"], "cpu", "two"), "does not match"),
    "env var without a name": (
        lambda s: _head_container(s)["env"].append({"value": "x"}), "'name' is a required property"),
    "env var twice": (
        lambda s: _head_container(s)["env"].append(dict(_head_container(s)["env"][0])), "duplicate list-map key"),
    "no head group": (
        lambda s: s["rayClusterConfig"].pop("headGroupSpec"), "'headGroupSpec' is a required property"),
    "serveConfigV2 as a mapping": (
        lambda s: _set(s, "serveConfigV2", {"applications": []}), "is not of type 'string'"),
}


@pytest.mark.parametrize("mutation", MUTATIONS, ids=str)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_schema_rejects_what_the_api_server_would(path, mutation, spec_validator):
    change, message = MUTATIONS[mutation]
    spec = copy.deepcopy(_rayservice(path)["spec"])
    change(spec)
    errors = _errors(spec_validator, spec)
    assert len(errors) == 1 and message in errors[0], errors


@pytest.mark.parametrize("port, valid", [(8000, True), ("serve", True), (8000.5, False), (None, False)])
def test_int_or_string_fields_take_an_integer_or_a_string(port, valid, spec_validator):
    spec = copy.deepcopy(_rayservice(CPU_MANIFEST)["spec"])
    _head_container(spec)["readinessProbe"] = {"httpGet": {"path": "/health", "port": port}}
    assert not _errors(spec_validator, spec) if valid else _errors(spec_validator, spec)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_passes_the_operators_own_checks(path):
    """Rules KubeRay's validation enforces beyond the CRD schema."""
    spec = _rayservice(path)["spec"]
    assert spec["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
    # One GPU (or one pod with a ReadWriteOnce home) cannot hold a second cluster.
    assert spec["upgradeStrategy"]["type"] == "None"
    assert "upgradeStrategy" not in spec["rayClusterConfig"], "refused for a RayService's own RayCluster"
    assert "name" not in spec["rayClusterConfig"]["headGroupSpec"].get("headService", {}).get("metadata", {})


# ---------------------------------------------------------------- the serve config


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_serve_config_is_a_valid_ray_serve_config(path):
    from ray.serve.schema import ServeDeploySchema

    serve = ServeDeploySchema.model_validate(_serve_config(_rayservice(path)))
    (app,) = serve.applications
    assert app.import_path == "kiln_ray.app:build_app" and app.route_prefix == "/"
    assert serve.http_options.host == "0.0.0.0" and serve.http_options.port == 8000


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_serve_args_validate_into_kiln_config_with_keys_from_the_secret(path):
    service = _rayservice(path)
    config = _kiln_config(service)
    assert config.api_key is not None and config.admin_key is not None
    for container in _containers(service):
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
        assert refs["KILN_API_KEY"]["name"] == refs["KILN_ADMIN_KEY"]["name"] == "kiln-api-keys"
        assert not refs["KILN_API_KEY"].get("optional"), "an unset key would leave the API open"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kiln_home_is_a_persistent_volume_on_the_engine_pod(path):
    """Adapters are written by the trainer and read by the engine, both in the engine's bundle:
    their pod must mount `home` from a claim this file defines."""
    service = _rayservice(path)
    config = _kiln_config(service)
    claims = {d["metadata"]["name"] for d in _documents(path) if d["kind"] == "PersistentVolumeClaim"}
    engine_groups = [g for g, _ in _groups(service) if _ray_resources(g)[0] > 0]
    assert engine_groups
    for group in engine_groups:
        volume = _mounts(group).get(config.home)
        assert volume is not None, f"{config.home} is not mounted"
        assert volume["persistentVolumeClaim"]["claimName"] in claims


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_model_path_is_mounted_on_every_pod(path):
    """Serve builds the app (and checks `model` exists) on the head; ingress and engine load it
    on the workers."""
    service = _rayservice(path)
    config = _kiln_config(service)
    if config.model == "default":
        return  # in the image
    for group, _ in _groups(service):
        where = group.get("groupName", "the head")
        assert any(Path(config.model).is_relative_to(p) for p in _mounts(group)), f"{config.model} on {where}"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_engine_bundle_and_ingress_fit_the_pods(path, monkeypatch):
    service = _rayservice(path)
    config = _kiln_config(service)
    gpu = config.device.startswith("cuda")
    deployments = _build(monkeypatch, service, gpu)
    (bundle,) = deployments["KilnEngine"]._replica_config.placement_group_bundles
    nodes = [(_ray_resources(g), count) for g, count in _groups(service)]
    # STRICT_PACK: the whole bundle on one pod.
    assert any(cpus >= bundle["CPU"] and gpus >= bundle.get("GPU", 0) for (cpus, gpus), _ in nodes)
    d = config.deploy
    wanted = d.ingress_cpus * d.ingress_replicas + (d.engine_cpus + d.trainer_cpus) * d.engine_replicas
    assert sum(cpus * count for (cpus, _), count in nodes) >= wanted
    assert sum(gpus * count for (_, gpus), count in nodes) >= d.engine_replicas * bundle.get("GPU", 0)


def _trainer_options(monkeypatch, config: KilnConfig, cuda: bool) -> dict:
    """The options the engine replica (actors/engine_actor.py) creates its trainer with, on a
    device with or without CUDA: its `_start_trainer`, run outside Ray with the actor's
    `.options()` recorded instead of called."""
    import actors.engine_actor as engine_actor

    recorded = {}

    class Recorder:
        def options(self, **options):
            recorded.update(options)
            return self

        def remote(self, *args):
            return None

    monkeypatch.setattr(engine_actor, "TrainerActor", Recorder())
    monkeypatch.setattr(engine_actor, "get_current_placement_group", lambda: None)  # it would start Ray
    monkeypatch.setattr(engine_actor.torch.cuda, "is_available", lambda: cuda)
    replica = engine_actor.KilnEngine.func_or_class.__new__(engine_actor.KilnEngine.func_or_class)
    replica.app_name = "kiln"
    replica._start_trainer(config, None)
    return recorded


def test_gpu_manifest_shares_one_gpu_between_engine_and_trainer(monkeypatch):
    service = _rayservice(GPU_MANIFEST)
    config = _kiln_config(service)
    assert config.device == "cuda" and config.dtype == "bfloat16"
    engine = _build(monkeypatch, service, gpu=True)["KilnEngine"]
    d = config.deploy
    assert engine._replica_config.placement_group_strategy == "STRICT_PACK"
    assert engine._replica_config.placement_group_bundles == [{"CPU": d.engine_cpus + d.trainer_cpus, "GPU": 1}]
    engine_share = engine.ray_actor_options["num_gpus"]
    trainer = _trainer_options(monkeypatch, config, cuda=True)
    assert trainer["num_cpus"] == d.trainer_cpus
    trainer_share = trainer["num_gpus"]
    assert engine_share == d.engine_gpu_fraction and 0 < engine_share < 1
    assert 0 < trainer_share < 1
    # Ray counts resources in units of 1/10000: together the two take exactly the bundle's GPU.
    assert round(engine_share * 10_000) + round(trainer_share * 10_000) == 10_000
    # The head advertises no GPU and no CPU, so every replica lands on the GPU worker.
    head, *workers = _groups(service)
    assert _ray_resources(head[0]) == (0, 0)
    assert [_ray_resources(g)[1] for g, _ in workers] == [1]
    for group, _ in workers:
        assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_cpu_manifest_runs_the_default_model_in_one_pod_without_a_gpu(monkeypatch):
    service = _rayservice(CPU_MANIFEST)
    config = _kiln_config(service)
    assert config.model == "default" and config.device == "cpu"
    assert not service["spec"]["rayClusterConfig"].get("workerGroupSpecs")
    engine = _build(monkeypatch, service, gpu=False)["KilnEngine"]
    assert engine.ray_actor_options["num_gpus"] == 0
    assert _trainer_options(monkeypatch, config, cuda=False)["num_gpus"] == 0
    d = config.deploy
    assert engine._replica_config.placement_group_bundles == [{"CPU": d.engine_cpus + d.trainer_cpus}]
    assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in _containers(service))


def test_manifests_run_the_image_the_dockerfile_builds():
    dockerfile = (K8S / "Dockerfile").read_text()
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M).group(1)
    version = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    for path, flavour in ((GPU_MANIFEST, "cuda"), (CPU_MANIFEST, "cpu")):
        service = _rayservice(path)
        assert service["spec"]["rayClusterConfig"]["rayVersion"] == ray_version
        assert {c["image"] for c in _containers(service)} == {f"kiln-ray:{version}-{flavour}"}


# ---------------------------------------------------------------- the Grafana dashboard

# Ray exports a custom metric `x` to Prometheus as `ray_x` (counters named *_total keep one
# _total; histograms add _bucket/_sum/_count).
_HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def _dashboard_queries() -> tuple[list[str], list[str]]:
    """(PromQL of every panel target, PromQL of every template variable)."""
    dashboard = json.loads((K8S / "grafana-kiln.json").read_text())
    panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    targets = [t for p in panels for t in p.get("targets", [])]
    assert all(t["datasource"]["uid"] == "${datasource}" for t in targets)
    variables = [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return [t["expr"] for t in targets], variables


def test_grafana_dashboard_charts_every_kiln_metric():
    panel_queries, _ = _dashboard_queries()
    used = set(re.findall(r"\bray_kiln_\w+", "\n".join(panel_queries)))
    missing = []
    for d in DEFINITIONS:
        series = f"ray_{d.name}_bucket" if d.kind == "histogram" else f"ray_{d.name}"
        if series not in used:
            missing.append(series)
    assert not missing, f"no panel charts {missing}"


def test_grafana_dashboard_names_only_exported_series_and_labels():
    defs = {f"ray_{d.name}": d for d in DEFINITIONS}
    panel_queries, variable_queries = _dashboard_queries()
    for expr in panel_queries + variable_queries:
        metrics = []
        for name in re.findall(r"\bray_kiln_\w+", expr):
            base = name
            for suffix in _HISTOGRAM_SERIES:
                if name.endswith(suffix) and name.removesuffix(suffix) in defs:
                    base = name.removesuffix(suffix)
            assert base in defs, f"{name} is not a kiln metric as Ray exports it ({expr})"
            assert base == name or defs[base].kind == "histogram", f"{name}: only histograms have {name[len(base):]}"
            metrics.append(defs[base])
        allowed = {"le", *(label for d in metrics for label in d.labels)}
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            labels = {label.strip() for label in group.split(",")}
            assert labels <= allowed, f"{expr}: {labels - allowed} are not labels of {[d.name for d in metrics]}"
