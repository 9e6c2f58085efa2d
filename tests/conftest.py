import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """arch -> (checkpoint dir, transformers model in fp32), built once per session."""
    from tests.model.tiny import VARIANTS, save_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: (root / arch, save_tiny_model(arch, root / arch)) for arch in VARIANTS}


@pytest.fixture(scope="session")
def default_model_dir():
    """The embedded SmolLM2-135M-Instruct as an HF directory (converted once if missing)."""
    from kiln_ray.config import KilnConfig
    from kiln_ray.model.default_model import ensure_default_model

    from pathlib import Path

    return ensure_default_model(Path(KilnConfig().home), progress=False)
