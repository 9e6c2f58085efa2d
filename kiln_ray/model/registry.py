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


def served_model_name(config) -> str:
    """The id clients put in `model`: config.served_model_name, else the checkpoint's name."""
    if config.served_model_name:
        return config.served_model_name
    if config.model == "default":
        from kiln_ray.model.default_model import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    path = Path(config.model)
    return path.stem if path.suffix == ".gguf" else path.name


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer: an HF directory's own, or the one embedded in a GGUF file."""
    from transformers import AutoTokenizer

    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(path)
