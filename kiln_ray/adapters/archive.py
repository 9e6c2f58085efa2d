"""Export and import one adapter version as a tar.gz of its PEFT files.

    adapter.tar.gz                      accepted on import (and nothing else):
      adapter_config.json                 the two files at the archive root, or
      adapter_model.safetensors           both inside one top-level folder `<dir>/`
                                          (plus optional entries for `./` and `<dir>/`)

Import never extracts to disk. It streams the archive through two byte counters (compressed
and decompressed), checks every member header before reading its data, reads the two files
into memory, validates them as a PEFT LoRA adapter (`read_tar`), and only then calls
`save_version` (`import_tar`; a caller with more checks to make runs them in between). So
an archive with traversal paths, links, devices, too many entries or a decompression bomb is
refused before anything is written, and the store's own atomic write does the rest.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zlib
from typing import BinaryIO

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from kiln_ray.adapters.store import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterNotFound,
    AdapterStore,
    InvalidAdapter,
    check_adapter,
    validate_name,
)

MiB = 1024 * 1024
MAX_CONFIG_BYTES = 1 * MiB
_PEFT_FILES = (CONFIG_FILE, WEIGHTS_FILE)


class UnsafeArchive(ValueError):
    """An uploaded archive that is malformed, too large, or could write outside its folder."""


def export_tar(store: AdapterStore, name: str, version: int | None = None) -> bytes:
    """A tar.gz of the version's PEFT files at the archive root (no optimizer state)."""
    meta = store.meta(name)
    version = meta["current_version"] if version is None else version
    vdir = store.version_dir(name, version)
    mtime = int(meta["versions"][version]["created_at"])
    try:
        files = {filename: (vdir / filename).read_bytes() for filename in _PEFT_FILES}
    except FileNotFoundError:
        raise AdapterNotFound(f"adapter {name!r} version {version} was deleted") from None
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for filename, data in files.items():
                info = tarfile.TarInfo(filename)
                info.size, info.mode, info.mtime = len(data), 0o644, mtime
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def import_tar(
    store: AdapterStore,
    name: str,
    data: bytes | BinaryIO,
    *,
    max_bytes: int = 512 * MiB,
    max_entries: int = 16,
    max_member_bytes: int | None = None,
) -> int:
    """Validate a tar.gz adapter upload and save it as a new version of `name`; return it.

    Raises InvalidAdapterName for a bad name (before reading anything) and UnsafeArchive for
    anything wrong with the archive (see `read_tar` for the limits); the store is then unchanged.
    """
    validate_name(name)
    tensors, config = read_tar(data, max_bytes=max_bytes, max_entries=max_entries,
                               max_member_bytes=max_member_bytes)
    return store.save_version(name, tensors, config)


def read_tar(
    data: bytes | BinaryIO,
    *,
    max_bytes: int = 512 * MiB,
    max_entries: int = 16,
    max_member_bytes: int | None = None,
) -> tuple[dict, dict]:
    """Validate a tar.gz adapter upload in memory; return its PEFT (tensors, config).

    Limits: `max_bytes` bounds the compressed size and, separately, the decompressed stream
    (headers included); `max_member_bytes` (default `max_bytes`) bounds each file;
    `max_entries` bounds the member count. Raises UnsafeArchive for anything wrong; writes
    nothing.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) > max_bytes:
            raise UnsafeArchive(f"archive is {len(data)} bytes compressed; limit {max_bytes}")
        data = io.BytesIO(data)
    member_limit = max_bytes if max_member_bytes is None else max_member_bytes
    files = _read_members(data, max_bytes, max_entries, member_limit)
    return _parse_adapter(files)


class _LimitedReader(io.RawIOBase):
    """A read-only stream that raises UnsafeArchive once more than `limit` bytes pass."""

    def __init__(self, stream: BinaryIO, limit: int, what: str):
        self.stream, self.limit, self.what, self.count = stream, limit, what, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        # Never ask for more than one byte past the limit, so a huge request cannot allocate.
        budget = self.limit - self.count + 1
        chunk = self.stream.read(budget if size is None or size < 0 else min(size, budget))
        self.count += len(chunk)
        if self.count > self.limit:
            raise UnsafeArchive(f"archive exceeds {self.limit} bytes {self.what}")
        return chunk

    def readinto(self, buffer) -> int:
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def _read_members(
    stream: BinaryIO, max_bytes: int, max_entries: int, max_member_bytes: int
) -> dict[str, bytes]:
    """Stream the archive; return {file name: bytes} for the two PEFT files."""
    compressed = _LimitedReader(stream, max_bytes, "compressed")
    decompressed = gzip.GzipFile(fileobj=compressed, mode="rb")
    tar_stream = _LimitedReader(decompressed, max_bytes, "uncompressed")
    files: dict[str, bytes] = {}
    file_folders: set[tuple[str, ...]] = set()  # () = the archive root
    dir_folders: set[str] = set()
    total = 0
    try:
        with tarfile.open(fileobj=tar_stream, mode="r|") as tar:
            for count, member in enumerate(tar, start=1):
                if count > max_entries:
                    raise UnsafeArchive(f"archive has more than {max_entries} entries")
                parts = _member_parts(member)
                if member.isdir():
                    if len(parts) > 1:
                        raise UnsafeArchive(f"nested directory {member.name!r} in archive")
                    dir_folders.update(parts)
                    continue
                if not member.isreg() or member.issparse():
                    raise UnsafeArchive(f"archive member {member.name!r} is not a regular file")
                if len(parts) > 2 or parts[-1] not in _PEFT_FILES or parts[-1] in files:
                    raise UnsafeArchive(
                        f"unexpected archive member {member.name!r}: only one {CONFIG_FILE} and "
                        f"one {WEIGHTS_FILE} are allowed, at the root or in one top-level folder"
                    )
                limit = MAX_CONFIG_BYTES if parts[-1] == CONFIG_FILE else max_member_bytes
                total += member.size
                if member.size > limit or total > max_bytes:
                    raise UnsafeArchive(
                        f"archive member {member.name!r} claims {member.size} bytes "
                        f"(limit {limit} per file, {max_bytes} in total)"
                    )
                files[parts[-1]] = _read_exactly(tar, member)
                file_folders.add(tuple(parts[:-1]))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise UnsafeArchive(f"not a valid tar.gz archive: {e}") from e
    missing = [f for f in _PEFT_FILES if f not in files]
    if missing:
        raise UnsafeArchive(f"archive is missing {', '.join(missing)}")
    if len(file_folders) != 1:
        raise UnsafeArchive("archive files must sit together, at the root or in one folder")
    (folder,) = file_folders
    if not dir_folders <= set(folder):
        raise UnsafeArchive(f"archive has directories besides the adapter's: {sorted(dir_folders)}")
    return files


def _member_parts(member: tarfile.TarInfo) -> list[str]:
    """Path components of a member name, without '.' and empty ones; refuses unsafe paths."""
    name = member.name
    if name.startswith("/") or "\\" in name or "\x00" in name or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchive(f"archive member {name!r} has an absolute or non-POSIX path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"archive member {name!r} has a '..' path component")
    if not parts and not member.isdir():
        raise UnsafeArchive(f"archive member {name!r} has an empty path")
    return parts


def _read_exactly(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    fileobj = tar.extractfile(member)
    data = fileobj.read(member.size) if fileobj is not None else b""
    if len(data) != member.size:
        raise UnsafeArchive(f"archive member {member.name!r} is truncated")
    return data


def _parse_adapter(files: dict[str, bytes]) -> tuple[dict, dict]:
    try:
        config = json.loads(files[CONFIG_FILE].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnsafeArchive(f"{CONFIG_FILE} is not valid JSON: {e}") from e
    try:
        tensors = load_safetensors(files[WEIGHTS_FILE])
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise UnsafeArchive(f"{WEIGHTS_FILE} is not a valid safetensors file: {e}") from e
    try:
        check_adapter(tensors, config)
    except InvalidAdapter as e:
        raise UnsafeArchive(f"archive is not a PEFT LoRA adapter: {e}") from e
    return tensors, config
