"""Build an in-process API server (routes + ServingNode + a local trainer, no Ray) for tests."""

import tempfile
import time

import torch

from kiln_ray.adapters.store import AdapterStore
from kiln_ray.api.engine_client import LocalEngineClient
from kiln_ray.api.routes import ServerContext, create_app
from kiln_ray.config import EngineConfig, KilnConfig, TrainingConfig
from kiln_ray.engine.async_engine import AsyncLLMEngine
from kiln_ray.engine.engine import LLMEngine
from kiln_ray.engine_metrics import EngineMetrics
from kiln_ray.model.loader import load_model
from kiln_ray.model.registry import load_tokenizer
from kiln_ray.node import LocalTraining, ServingNode
from kiln_ray.training.service import TrainingService
from kiln_ray.training.trainer import Trainer

MODEL_NAME = "tiny-smol"


def make_app(model_dir, home=None, training: dict | None = None, server: dict | None = None, **engine_overrides):
    """FastAPI app + its AsyncLLMEngine. With `home`, adapters live there and a local trainer
    (sharing the engine's model object: one copy of the weights) serves the training routes;
    without, an empty adapter store and no trainer. `server`: more top-level KilnConfig fields
    (api keys, request_timeout_s, ...). Wired like a KilnEngine replica: the engine's figures
    are recorded by an EngineMetrics that the node hands to the ingress's /metrics."""
    train = home is not None
    home = home or tempfile.mkdtemp(prefix="kiln-test-home-")
    engine_cfg = EngineConfig(**{"num_kv_blocks": 512, "max_num_seqs": 32, **engine_overrides})
    config = KilnConfig(model=str(model_dir), engine=engine_cfg, home=str(home),
                        training=TrainingConfig(**(training or {})), **{"request_timeout_s": 60, **(server or {})})
    model = load_model(model_dir, torch.float32, "cpu")
    metrics = EngineMetrics()
    engine = AsyncLLMEngine(LLMEngine(model, engine_cfg, tokenizer_path=model_dir), on_step=metrics.on_step)
    writer = AdapterStore(config.adapter_dir)  # created first: a read-only store needs the folder
    node = ServingNode(engine, AdapterStore(config.adapter_dir, read_only=True), config.state_dir, None, metrics)
    service = None
    if train:
        service = TrainingService(Trainer(model), writer, node.apply_threadsafe,
                                  max_queued_jobs=config.training.max_queued_jobs,
                                  upload_max_bytes=config.training.upload_max_bytes,
                                  max_rank=config.engine.max_lora_rank)
        service.start()
        node.training = LocalTraining(service)
    tokenizer = load_tokenizer(model_dir)
    ctx = ServerContext(
        config=config,
        engine=LocalEngineClient(node, MODEL_NAME),
        tokenizer=tokenizer,
        model_name=MODEL_NAME,
        max_model_len=engine.engine.max_model_len,
        vocab_size=engine.engine.model.config.vocab_size,
    )
    app = create_app(ctx)
    app.router.on_startup.append(node.start)
    engine.service = service
    return app, engine


def wait_idle(engine, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = engine.stats()
        if s.running == 0 and s.waiting == 0 and s.kv_blocks_used == 0:
            return s
        time.sleep(0.05)
    raise AssertionError(f"engine not idle: {engine.stats()}")
