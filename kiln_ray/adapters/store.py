"""AdapterStore: versioned LoRA adapters on disk, in PEFT format.

    <root>/.tmp/                                staging area; emptied when a writer opens
    <root>/<name>/meta.json                     the commit record (see below)
    <root>/<name>/examples.jsonl                training examples, one JSON object a line
    <root>/<name>/v<N>/adapter_config.json      PEFT LoraConfig (peft_type "LORA")
    <root>/<name>/v<N>/adapter_model.safetensors
    <root>/<name>/v<N>/optimizer.pt             optional trainer state, opaque bytes

    meta.json  {"name", "created_at", "current_version", "last_version", "examples_bytes",
                "versions": {"<N>": {"created_at", "parent", "job_id", "metrics"}}}

A version directory is exactly what `peft.PeftModel.from_pretrained` (and vLLM) load; its
tensor keys are `base_model.model.model.layers.{i}.{self_attn|mlp|linear_attn}.{module}
.lora_{A|B}.weight`, A (r, in) and B (out, r).

Crash safety. Every write is staged in `<root>/.tmp/` (same filesystem), fsynced, then moved
into place with one rename; meta.json is replaced with `os.replace`. meta.json is the commit
point: a version directory not listed there is a leftover of an interrupted save, invisible
to readers and removed when a writer opens the store. examples.jsonl is append-only and
meta.json records how many of its bytes are committed (`examples_bytes`; absent in stores
written before it existed: the whole file). Readers read that prefix, so examples saved with
a version appear with it, and the tail of a failed or interrupted append stays invisible
until the next append cuts it off. So after a crash or a full disk a reader sees either the
old state or the new one. Version numbers are never reused (`last_version`), so `name@N`
always means the same weights.

Concurrency. One process (the trainer) writes, through one `AdapterStore`; its methods are
thread-safe (a lock serialises every mutation). Other processes open the store with
`read_only=True` and only read: a writable store empties `.tmp` on open, which would destroy
a concurrent writer's staging files.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as serialize_safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
META_FILE = "meta.json"
EXAMPLES_FILE = "examples.jsonl"
TMP_DIR = ".tmp"

log = logging.getLogger("kiln_ray.adapters")

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_VERSION_DIR = re.compile(r"v([1-9][0-9]*)")
LORA_KEY = re.compile(
    r"(?P<module_path>base_model\.model\.model\.layers\.\d+\.(?:self_attn|mlp|linear_attn)\."
    r"(?P<module>[A-Za-z0-9_]+))\.lora_(?P<ab>[AB])\.weight"
)
# Keys PEFT and vLLM read; a config given to the store is laid over these.
_CONFIG_DEFAULTS = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "bias": "none",
    "lora_dropout": 0.0,
    "use_rslora": False,
    "fan_in_fan_out": False,
    "base_model_name_or_path": None,
}


class AdapterStoreError(Exception):
    """A store operation failed (I/O error, disk full, forbidden operation)."""


class AdapterNotFound(AdapterStoreError, KeyError):
    """An adapter name or version that the store does not hold."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else "adapter not found"


class InvalidAdapterName(AdapterStoreError, ValueError):
    """A name outside `[A-Za-z0-9._-]{1,64}`, or starting with '.'; or a malformed `name@N`."""


class InvalidAdapter(AdapterStoreError, ValueError):
    """Tensors or config that do not form a PEFT LoRA adapter."""


def validate_name(name: str) -> str:
    """Return `name` if it is a valid adapter name (never a path), else raise InvalidAdapterName."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.startswith("."):
        raise InvalidAdapterName(
            f"invalid adapter name {name!r}: use 1-64 characters from [A-Za-z0-9._-], "
            "not starting with '.'"
        )
    return name


# Names that `model` cannot select an adapter by: `model: "default"` asks for the server's
# default adapter. (The base model's served name is the other such name; only the server
# knows it: see validate_new_name.)
RESERVED_NAMES = frozenset({"default"})


def validate_new_name(name: str, base_model: str | None = None) -> str:
    """`validate_name`, and refuse a name that `model` would never resolve to the adapter: one
    of RESERVED_NAMES, or `base_model` (the served model name, which always means the base
    model). For names an adapter is created or trained under. `validate_name` itself accepts
    them: an adapter stored under one before this check stays readable and deletable."""
    validate_name(name)
    if name in RESERVED_NAMES or name == base_model:
        meant = "the base model" if name == base_model else "the server's default adapter (or the base model)"
        raise InvalidAdapterName(
            f"adapter name {name!r} is reserved: `model: {name!r}` means {meant}, so an adapter "
            "of that name could not be selected; choose another name"
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`"x@3"` -> `("x", 3)`; `"x"` -> `("x", None)` (the current version)."""
    if not isinstance(ref, str):
        raise InvalidAdapterName(f"invalid adapter reference {ref!r}")
    name, sep, version = ref.partition("@")
    validate_name(name)
    if not sep:
        return name, None
    if not re.fullmatch(r"[1-9][0-9]{0,17}", version):
        raise InvalidAdapterName(f"invalid adapter version in {ref!r}: expected name@N, N >= 1")
    return name, int(version)


# --- PEFT format -----------------------------------------------------------------------


def lora_config(config: dict) -> dict:
    """The PEFT defaults (LORA, CAUSAL_LM, bias none, ...) overlaid with `config`."""
    return {**_CONFIG_DEFAULTS, **config}


def lora_scale(config: dict) -> float:
    """The factor PEFT applies to `B @ A`: alpha / r (alpha / sqrt(r) with rsLoRA)."""
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def lora_pairs(
    tensors: dict[str, torch.Tensor],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT tensors -> {module path: (A (r, in), B (out, r))}; the path ends in the module name."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.fullmatch(key) if isinstance(key, str) else None
        if match is None:
            raise InvalidAdapter(
                f"tensor key {key!r} is not a PEFT LoRA key "
                "(base_model.model.model.layers.<i>.<self_attn|mlp|linear_attn>.<module>"
                ".lora_<A|B>.weight)"
            )
        halves.setdefault(match["module_path"], {})[match["ab"]] = tensor
    missing = [path for path, ab in halves.items() if len(ab) != 2]
    if missing:
        raise InvalidAdapter(f"LoRA modules without both lora_A and lora_B: {missing}")
    return {path: (ab["A"], ab["B"]) for path, ab in halves.items()}


def check_adapter(tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Raise InvalidAdapter unless (tensors, config) is a PEFT LoRA adapter the store can hold.

    Checks: a LORA config with int r > 0, alpha > 0, a list of target module names, bias
    "none", no DoRA and no per-module rank/alpha patterns; tensor keys of the PEFT LoRA form
    for modules named in target_modules; A (r, in) and B (out, r) floating-point matrices.
    """
    _check_config(config)
    if not isinstance(tensors, dict) or not tensors:
        raise InvalidAdapter("an adapter needs at least one lora_A/lora_B pair")
    r, targets = config["r"], set(config["target_modules"])
    for path, (a, b) in lora_pairs(tensors).items():
        module = path.rsplit(".", 1)[1]
        if module not in targets:
            raise InvalidAdapter(
                f"{path}: module {module!r} is not in target_modules {sorted(targets)}"
            )
        for half, t in (("lora_A", a), ("lora_B", b)):
            if not isinstance(t, torch.Tensor) or t.ndim != 2 or not t.is_floating_point():
                raise InvalidAdapter(f"{path}.{half} must be a 2-D floating-point tensor")
        if a.shape[0] != r or b.shape[1] != r:
            raise InvalidAdapter(
                f"{path}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not match "
                f"A (r, in), B (out, r) with r = {r}"
            )


def _check_config(config: dict) -> None:
    if not isinstance(config, dict):
        raise InvalidAdapter("adapter_config must be a JSON object")
    if config.get("peft_type") != "LORA":
        raise InvalidAdapter(
            f"adapter_config peft_type must be 'LORA', got {config.get('peft_type')!r}"
        )
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise InvalidAdapter(f"adapter_config r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise InvalidAdapter(f"adapter_config lora_alpha must be a positive number, got {alpha!r}")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets or not all(
        isinstance(t, str) and t for t in targets
    ):
        raise InvalidAdapter(
            f"adapter_config target_modules must be a list of names, got {targets!r}"
        )
    if config.get("bias", "none") != "none":
        raise InvalidAdapter("adapter_config bias must be 'none'")
    if config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise InvalidAdapter("DoRA and per-module rank_pattern/alpha_pattern are not supported")
    try:
        json.dumps(config)
    except (TypeError, ValueError) as e:
        raise InvalidAdapter(f"adapter_config is not JSON-serialisable: {e}") from e


# --- the store -------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterVersion:
    """One version read into memory; the CPU tensors belong to the caller (no file stays open)."""

    name: str
    version: int
    tensors: dict[str, torch.Tensor]
    config: dict
    optimizer_state: bytes | None


class AdapterStore:
    def __init__(self, root: Path, *, read_only: bool = False):
        """Open the store at `root`. A writable store creates `root` and clears the leftovers
        of interrupted writes (`.tmp` contents and version directories no meta.json lists)."""
        self.root = Path(root).resolve()
        self.read_only = read_only
        self._tmp = self.root / TMP_DIR
        self._lock = threading.RLock()
        if not read_only:
            self._tmp.mkdir(parents=True, exist_ok=True)
            self._clear_leftovers()

    # --- reading ---

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir()
            if _NAME.fullmatch(p.name) and not p.name.startswith(".") and not p.is_symlink()
            and self.exists(p.name)
        )

    def exists(self, name: str) -> bool:
        return (self._name_dir(name) / META_FILE).is_file()

    def meta(self, name: str) -> dict:
        """The adapter's meta.json, with `versions` keyed by int."""
        path = self._name_dir(name) / META_FILE
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise AdapterNotFound(f"adapter {name!r} not found") from None
        meta["versions"] = {int(v): info for v, info in meta["versions"].items()}
        return meta

    def versions(self, name: str) -> list[int]:
        return sorted(self.meta(name)["versions"])

    def current_version(self, name: str) -> int | None:
        return self.meta(name)["current_version"]

    def version_dir(self, name: str, version: int) -> Path:
        """The PEFT directory of an existing version (valid until that version is deleted)."""
        self._require_version(self.meta(name), version)
        return self._version_path(name, version)

    def load_version(self, name: str, version: int | None = None) -> AdapterVersion:
        """Read one version (None = current) into memory; tensors are on CPU."""
        meta = self.meta(name)
        version = meta["current_version"] if version is None else version
        self._require_version(meta, version)
        vdir = self._version_path(name, version)
        try:
            config = json.loads((vdir / CONFIG_FILE).read_text())
            tensors = load_file(vdir / WEIGHTS_FILE)
            opt = vdir / OPTIMIZER_FILE
            optimizer_state = opt.read_bytes() if opt.is_file() else None
        except FileNotFoundError:
            raise AdapterNotFound(f"adapter {name!r} version {version} was deleted") from None
        return AdapterVersion(name, version, tensors, config, optimizer_state)

    def version_config(self, name: str, version: int | None = None) -> dict:
        """The adapter_config.json of one version (None = current), without its tensors."""
        meta = self.meta(name)
        version = meta["current_version"] if version is None else version
        self._require_version(meta, version)
        try:
            return json.loads((self._version_path(name, version) / CONFIG_FILE).read_text())
        except FileNotFoundError:
            raise AdapterNotFound(f"adapter {name!r} version {version} was deleted") from None

    def load_examples(self, name: str) -> list[dict]:
        """The committed examples, oldest first."""
        meta = self.meta(name)
        path = self._name_dir(name) / EXAMPLES_FILE
        if not path.is_file():
            return []
        with open(path, "rb") as f:
            data = f.read(meta.get("examples_bytes"))  # None (an older store): the whole file
        return [json.loads(line) for line in data.decode().splitlines() if line.strip()]

    # --- writing ---

    def save_version(
        self,
        name: str,
        tensors: dict[str, torch.Tensor],
        config: dict,
        *,
        parent: int | None = None,
        job_id: str | None = None,
        metrics: dict | None = None,
        optimizer_state: bytes | None = None,
        examples: list[dict] | None = None,
    ) -> int:
        """Write a new version (number = highest ever issued + 1) and make it current.

        `config` is laid over the PEFT defaults (see `lora_config`); the pair must pass
        `check_adapter`. `parent` is a version of the same adapter. `examples` (the training
        examples of this version) are appended to the adapter's examples in the same commit.
        On any OSError (e.g. disk full) nothing changes and AdapterStoreError is raised.
        """
        self._require_writable()
        validate_name(name)
        config = lora_config(config)
        check_adapter(tensors, config)
        lines = _example_lines(examples or [])
        try:
            json.dumps({"job_id": job_id, "metrics": metrics})
        except (TypeError, ValueError) as e:
            raise ValueError(f"job_id and metrics must be JSON-serialisable: {e}") from e
        # Own copies: safetensors refuses tensors that share storage (views of one buffer).
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        with self._lock:
            is_new = not self.exists(name)
            meta = self._new_meta(name) if is_new else self.meta(name)
            if parent is not None:
                self._require_version(meta, parent)
            version = meta["last_version"] + 1
            meta["versions"][version] = {
                "created_at": time.time(), "parent": parent, "job_id": job_id, "metrics": metrics,
            }
            meta["current_version"] = meta["last_version"] = version
            try:
                self._commit_version(name, meta, is_new, tensors, config, optimizer_state, lines)
            except OSError as e:
                raise AdapterStoreError(
                    f"could not save adapter {name!r} version {version}: {_describe(e)}; "
                    f"the store is unchanged"
                ) from e
        return version

    def set_current(self, name: str, version: int) -> None:
        """Make an existing version current (rollback or roll forward)."""
        self._require_writable()
        with self._lock:
            meta = self.meta(name)
            self._require_version(meta, version)
            meta["current_version"] = version
            self._guarded(f"set the current version of {name!r}", self._write_meta, name, meta)

    def delete_version(self, name: str, version: int) -> None:
        """Delete a version that is not current."""
        self._require_writable()
        with self._lock:
            meta = self.meta(name)
            self._require_version(meta, version)
            if version == meta["current_version"]:
                raise AdapterStoreError(
                    f"version {version} is the current version of {name!r}; "
                    "set another version current before deleting it"
                )
            del meta["versions"][version]
            self._guarded(f"delete {name!r} version {version}", self._write_meta, name, meta)
            self._discard(self._version_path(name, version))

    def delete(self, name: str) -> None:
        """Delete an adapter with all its versions and examples."""
        self._require_writable()
        with self._lock:
            self.meta(name)
            self._guarded(f"delete {name!r}", self._discard, self._name_dir(name))

    def append_examples(self, name: str, examples: list[dict]) -> None:
        """Append examples to `examples.jsonl`; all of them or none become visible."""
        self._require_writable()
        lines = _example_lines(examples)
        with self._lock:
            meta = self.meta(name)
            self._guarded(f"append examples to {name!r}", self._commit_examples, name, meta, lines)

    # --- internals ---

    def _name_dir(self, name: str) -> Path:
        path = self.root / validate_name(name)
        resolved = path.resolve()
        if resolved.parent != self.root:  # e.g. a symlink planted in the store
            raise AdapterStoreError(f"adapter path {resolved} is outside the store {self.root}")
        return path

    def _version_path(self, name: str, version: int) -> Path:
        path = self._name_dir(name) / f"v{version}"
        if path.resolve().parent != self._name_dir(name).resolve():
            raise AdapterStoreError(f"version path {path.resolve()} is outside the store")
        return path

    def _new_meta(self, name: str) -> dict:
        return {
            "name": name, "created_at": time.time(), "current_version": None,
            "last_version": 0, "examples_bytes": 0, "versions": {},
        }

    @staticmethod
    def _require_version(meta: dict, version: int) -> None:
        if version not in meta["versions"]:
            raise AdapterNotFound(
                f"adapter {meta['name']!r} has no version {version!r} "
                f"(versions: {sorted(meta['versions'])})"
            )

    def _require_writable(self) -> None:
        if self.read_only:
            raise AdapterStoreError(f"the adapter store at {self.root} was opened read-only")

    def _guarded(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except OSError as e:
            raise AdapterStoreError(f"could not {what}: {_describe(e)}") from e

    def _staging_dir(self) -> Path:
        path = self._tmp / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def _commit_version(
        self, name: str, meta: dict, is_new: bool, tensors: dict[str, torch.Tensor],
        config: dict, optimizer_state: bytes | None, examples: bytes,
    ) -> None:
        """Stage meta's current version in .tmp and commit it. A new adapter appears with one
        rename (meta.json and examples included); otherwise the examples are appended past the
        committed ones, the version directory is renamed into place and meta.json replaced,
        and the first two are undone if a later step fails."""
        version = meta["current_version"]
        staging = self._staging_dir()
        try:
            if is_new:
                self._write_version(staging / f"v{version}", tensors, config, optimizer_state)
                if examples:
                    _write_bytes(staging / EXAMPLES_FILE, examples)
                meta["examples_bytes"] = len(examples)
                self._write_meta_file(staging / META_FILE, meta)
                self._commit_rename(staging, self._name_dir(name))
                return
            target = self._version_path(name, version)
            if target.exists():  # an uncommitted leftover; not part of the state
                self._discard(target)
            self._write_version(staging, tensors, config, optimizer_state)
            path, kept = self._examples_kept(name, meta)
            renamed = False
            try:
                self._append_examples(path, kept, meta, examples)
                self._commit_rename(staging, target)
                renamed = True
                self._write_meta(name, meta)
            except Exception:
                if examples:
                    _cut(path, kept)
                if renamed:
                    self._discard(target)
                raise
        except Exception:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _commit_examples(self, name: str, meta: dict, examples: bytes) -> None:
        path, kept = self._examples_kept(name, meta)
        try:
            self._append_examples(path, kept, meta, examples)
            self._write_meta(name, meta)
        except Exception:
            if examples:
                _cut(path, kept)
            raise

    def _examples_kept(self, name: str, meta: dict) -> tuple[Path, int | None]:
        """examples.jsonl and how many of its bytes are committed (None: there is no file)."""
        path = self._name_dir(name) / EXAMPLES_FILE
        if not path.is_file():
            return path, None
        committed = meta.get("examples_bytes")  # None in an older store: the whole file
        return path, path.stat().st_size if committed is None else committed

    @staticmethod
    def _append_examples(path: Path, kept: int | None, meta: dict, examples: bytes) -> None:
        """Write `examples` after the `kept` committed bytes (cutting off any uncommitted
        tail) and record the new length in `meta`; they stay invisible until meta.json is
        replaced with it."""
        if examples:
            _write_at(path, kept or 0, examples)
            _fsync_dir(path.parent)  # a new file's name must be durable before meta.json
        meta["examples_bytes"] = (kept or 0) + len(examples)

    def _write_version(
        self, vdir: Path, tensors: dict[str, torch.Tensor], config: dict,
        optimizer_state: bytes | None,
    ) -> None:
        vdir.mkdir(exist_ok=True)
        _write_bytes(vdir / CONFIG_FILE, json.dumps(config, indent=2).encode())
        # Serialised here and written by `_write_bytes`: safetensors' own file writer reports a
        # full disk as a SafetensorError, without the errno.
        _write_bytes(vdir / WEIGHTS_FILE, serialize_safetensors(tensors, metadata={"format": "pt"}))
        if optimizer_state is not None:
            _write_bytes(vdir / OPTIMIZER_FILE, optimizer_state)
        _fsync_dir(vdir)

    def _commit_rename(self, src: Path, dst: Path) -> None:
        """Move a staged directory into place durably; if that fails it is back at `src`."""
        os.rename(src, dst)
        try:
            _fsync_dir(dst.parent)
        except OSError:
            os.rename(dst, src)
            raise

    def _write_meta(self, name: str, meta: dict) -> None:
        """Replace meta.json: the commit. Once the replace is done the new state is visible,
        so nothing after it may fail the caller (who would undo what meta.json now lists)."""
        tmp = self._tmp / f"{uuid.uuid4().hex}.json"
        try:
            self._write_meta_file(tmp, meta)
            os.replace(tmp, self._name_dir(name) / META_FILE)
        finally:
            tmp.unlink(missing_ok=True)
        try:
            _fsync_dir(self._name_dir(name))
        except OSError as e:  # a power loss may bring back the old state, which is consistent
            log.warning("committed %r but could not fsync its directory: %s", name, e)

    @staticmethod
    def _write_meta_file(path: Path, meta: dict) -> None:
        _write_bytes(path, json.dumps(meta, indent=2).encode())

    def _discard(self, path: Path) -> None:
        """Remove a directory: one rename out of sight, then delete at leisure."""
        trash = self._tmp / f"trash-{uuid.uuid4().hex}"
        os.rename(path, trash)
        _fsync_dir(path.parent)
        shutil.rmtree(trash, ignore_errors=True)

    def _clear_leftovers(self) -> None:
        for entry in self._tmp.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        for name in self.names():
            listed = self.meta(name)["versions"]
            for entry in self._name_dir(name).iterdir():
                match = _VERSION_DIR.fullmatch(entry.name)
                if match and int(match[1]) not in listed and entry.is_dir():
                    self._discard(entry)


def _describe(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return f"disk full ({error})"
    return str(error)


def _example_lines(examples: list[dict]) -> bytes:
    lines = []
    for example in examples:
        if not isinstance(example, dict):
            raise ValueError(f"an example must be a JSON object, got {type(example).__name__}")
        lines.append(json.dumps(example, ensure_ascii=False) + "\n")
    return "".join(lines).encode()


def _write_bytes(path: Path, data: bytes) -> None:
    """Create `path` holding `data`, durably. Every new file of the store is written here."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_at(path: Path, offset: int, data: bytes) -> None:
    """Cut `path` (created if missing) to `offset` bytes and write `data` there, durably."""
    with open(path, "ab") as f:
        f.truncate(offset)
        f.write(data)  # append mode: writes go to the end, which is now `offset`
        f.flush()
        os.fsync(f.fileno())


def _cut(path: Path, length: int | None) -> None:
    """Best effort: cut `path` back to `length` bytes (None: remove it). Needs no free space;
    if it fails anyway, the tail stays invisible and the next append cuts it off."""
    try:
        if length is None:
            path.unlink(missing_ok=True)
        else:
            os.truncate(path, length)
    except OSError as e:
        log.warning("could not cut %s back to %s bytes: %s", path, length, e)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
