"""Build an in-process API server (routes + AsyncLLMEngine, no Ray) for tests."""

import time

import torch

from kiln_ray.api.engine_client import LocalEngineClient
from kiln_ray.api.routes import ServerContext, create_app
from kiln_ray.config import EngineConfig, KilnConfig
from kiln_ray.engine.async_engine import AsyncLLMEngine
from kiln_ray.engine.engine import LLMEngine
from kiln_ray.model.loader import load_model
from kiln_ray.model.registry import load_tokenizer

MODEL_NAME = "tiny-smol"


def make_app(model_dir, **engine_overrides):
    engine_cfg = EngineConfig(**{"num_kv_blocks": 512, "max_num_seqs": 32, **engine_overrides})
    config = KilnConfig(model=str(model_dir), engine=engine_cfg, request_timeout_s=60)
    engine = AsyncLLMEngine(LLMEngine(load_model(model_dir, torch.float32, "cpu"), engine_cfg))
    tokenizer = load_tokenizer(model_dir)
    ctx = ServerContext(
        config=config,
        engine=LocalEngineClient(engine, MODEL_NAME),
        tokenizer=tokenizer,
        model_name=MODEL_NAME,
        max_model_len=engine.engine.max_model_len,
        vocab_size=engine.engine.model.config.vocab_size,
    )
    return create_app(ctx), engine



def wait_idle(engine, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = engine.stats()
        if s.running == 0 and s.waiting == 0 and s.kv_blocks_used == 0:
            return s
        time.sleep(0.05)
    raise AssertionError(f"engine not idle: {engine.stats()}")

