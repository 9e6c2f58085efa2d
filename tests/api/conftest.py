"""Fixtures: an in-process API server over a tiny random-weight llama that uses SmolLM2's real
tokenizer and chat template (vocab 49152), talked to through FastAPI's TestClient and the
official openai SDK. No Ray."""

import shutil

import openai
import pytest
import torch

from kiln_ray.model.registry import load_tokenizer
from tests.api.server import make_app


@pytest.fixture(scope="session")
def tiny_smol_dir(tmp_path_factory, default_model_dir):
    """A 2-layer random llama with SmolLM2's vocabulary and tokenizer files."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    model = tf.LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("tiny-smol")
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (default_model_dir / name).exists():
            shutil.copy(default_model_dir / name, path / name)
    return path



@pytest.fixture(scope="module")
def server(tiny_smol_dir):
    from fastapi.testclient import TestClient

    app, engine = make_app(tiny_smol_dir, max_model_len=512)
    with TestClient(app) as client:
        yield client, engine
    engine.shutdown()


@pytest.fixture(scope="module")
def http(server):
    return server[0]


@pytest.fixture(scope="module")
def engine(server):
    return server[1]


@pytest.fixture(scope="module")
def sdk(http) -> openai.OpenAI:
    """The official client, talking to the in-process app."""
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_smol_dir):
    return load_tokenizer(tiny_smol_dir)

