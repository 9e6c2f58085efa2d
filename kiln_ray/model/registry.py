"""Turn the configured `model` value into a path the loader reads."""

from __future__ import annotations

from pathlib import Path


def resolve_model_path(spec: str, home: str | Path) -> Path:
    """'default' -> the embedded SmolLM2-135M-Instruct, converted once under `home`;
    anything else is a Hugging Face checkpoint directory or a .gguf file."""
    if spec == "default":
        from kiln_ray.model.default_model import ensure_default_model

        return ensure_default_model(Path(home), progress=True)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {spec!r} not found: give 'default', a checkpoint directory or a .gguf file "
            "(weights are never downloaded at run time)"
        )
    return path
