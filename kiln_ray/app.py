"""build_app: serve_config.yaml `args` -> the Ray Serve application.

    KilnIngress (CPU, N replicas)  --submit (a call per request)-->  KilnEngine (1 per device)
                                   <--one subscription stream per (ingress, engine) pair--

The engine replica gets a placement group of one bundle holding its CPUs, room for the
trainer actor it will start beside it, and on a GPU node the whole GPU (STRICT_PACK keeps it
on one node). Fractional CPU reservations let ingress + engine + trainer start on a 2-core
machine.
"""

from __future__ import annotations

import logging

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from actors.engine_actor import KilnEngine
from kiln_ray.api.ingress import KilnIngress
from kiln_ray.config import KilnConfig
from kiln_ray.model.registry import resolve_model_path

log = logging.getLogger(__name__)

# Ray starts worker processes at nice 15. The serving path (ingress, engine) runs at normal
# priority instead, so on a shared machine decoding is not starved by ordinary processes; the
# trainer keeps Ray's default, so when the two compete for cores, serving wins.
SERVING_RUNTIME_ENV = {"env_vars": {"RAY_worker_niceness": "0"}}


def build_app(args: dict) -> serve.Application:
    config = KilnConfig.from_args(args)
    use_gpu = _wants_gpu(config)
    # Convert/locate the model once, here, so replicas never race to do it.
    config = config.model_copy(update={"model": str(resolve_model_path(config.model, config.home))})
    d = config.deploy
    bundle = {"CPU": d.engine_cpus + d.trainer_cpus}
    engine_actor = {"num_cpus": d.engine_cpus, "num_gpus": d.gpu_shares(use_gpu)[0],
                    "runtime_env": SERVING_RUNTIME_ENV}
    if use_gpu:
        bundle["GPU"] = 1
    engine = KilnEngine.options(
        num_replicas=d.engine_replicas,
        ray_actor_options=engine_actor,
        placement_group_bundles=[bundle],
        placement_group_strategy="STRICT_PACK",
        # Subscriptions and aborts go to the replica they name (actors/engine_router.py).
        request_router_config=RequestRouterConfig(request_router_class="actors.engine_router:KilnEngineRouter"),
        max_ongoing_requests=d.engine_max_ongoing_requests,
        health_check_period_s=d.health_check_period_s,
        health_check_timeout_s=d.health_check_timeout_s,
    ).bind(config.model_dump())
    return KilnIngress.options(
        num_replicas=d.ingress_replicas,
        ray_actor_options={"num_cpus": d.ingress_cpus, "runtime_env": SERVING_RUNTIME_ENV},
        max_ongoing_requests=d.ingress_max_ongoing_requests,
    ).bind(engine, config.model_dump())


def _wants_gpu(config: KilnConfig) -> bool:
    """A deployment asking for a GPU the cluster does not have would stay pending forever
    without an error: refuse it here, clearly."""
    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    if config.device == "auto":
        return gpus > 0
    if config.device.startswith("cuda"):
        if gpus <= 0:
            raise ValueError(
                f"device is {config.device!r} but the Ray cluster has no GPU "
                "(the engine would wait forever for one); use device: cpu or auto"
            )
        return True
    return False
