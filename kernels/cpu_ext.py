"""Small C kernels for the CPU, built once with the system C compiler and loaded with ctypes.

No torch headers are involved (a torch C++ extension takes ~40 s to build; these take ~1 s):
the C functions take raw pointers and strides; each Python wrapper checks the layout its
kernel accepts. The shared object is cached under the system temp dir, keyed by the hash of
the source and csrc/'s headers and by the compiler flags, and rebuilt when any changes. If
no compiler is available the callers fall back to pure torch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# -fopenmp links libgomp.so.1: the torch CPU wheel ships and loads a libgomp with that soname,
# so the kernels share torch's OpenMP thread pool rather than competing with it.
# -ffast-math is for compiling only: at link time GCC would add crtfastmath.o, whose
# constructor switches the whole process to flush-to-zero when the library is loaded.
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC", "-fopenmp"]
LDFLAGS = ["-shared", "-fopenmp"]


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """Build (if needed) and load csrc/<name>.c; None when it cannot be built here."""
    source = CSRC / f"{name}.c"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: %s falls back to pure torch", name)
        return None
    # -march=native: the build is only valid on this kind of CPU, so its flags are in the key.
    headers = b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))
    key = source.read_bytes() + headers + " ".join(CFLAGS + LDFLAGS).encode() + _cpu_signature().encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    build_dir = Path(tempfile.gettempdir()) / f"kiln-ray-kernels-{os.getuid()}"
    build_dir.mkdir(parents=True, exist_ok=True)
    lib = build_dir / f"{name}-{digest}.so"
    if not lib.exists():
        stem = f"{name}-{digest}.{os.getpid()}-{threading.get_ident()}"
        obj, tmp = build_dir / f"{stem}.o", build_dir / f"{stem}.so.tmp"
        for cmd in ([compiler, *CFLAGS, "-c", str(source), "-o", str(obj)],
                    [compiler, *LDFLAGS, str(obj), "-o", str(tmp), "-lm"]):
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                log.warning("building %s failed, falling back to pure torch:\n%s", name, result.stderr[-2000:])
                return None
        obj.unlink(missing_ok=True)
        os.replace(tmp, lib)  # atomic: concurrent builders never load a half-written file
    import torch  # noqa: F401  (load torch's OpenMP runtime first, so the kernel binds to it)

    return ctypes.CDLL(str(lib))


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    lines = [l for l in info.splitlines() if l.startswith(("model name", "flags", "Features"))]
    return platform.machine() + "\n".join(sorted(set(lines)))


@functools.cache
def function(lib_name: str, fn_name: str, argtypes: tuple, restype=None) -> ctypes._CFuncPtr | None:
    """A typed function of csrc/<lib_name>.c (returning `restype`, None for void), or None when
    that library cannot be built here."""
    lib = load(lib_name)
    if lib is None:
        return None
    fn = getattr(lib, fn_name)
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int if fn_name == "paged_decode_attention" else restype
    return fn


P, I64, F32, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


def ptr(t) -> int | None:
    """Address of a tensor's data (None for an absent tensor)."""
    return None if t is None else t.data_ptr()


def check_slots(slots, num_slots: int) -> None:
    """Pool rows a C kernel is about to write in place: in range and distinct (torch's indexing
    would raise or wrap; raw pointers would write elsewhere). N is a few dozen: cheap."""
    ids = slots.tolist()
    if ids and (min(ids) < 0 or max(ids) >= num_slots or len(set(ids)) != len(ids)):
        raise IndexError(f"state slots {ids} out of range [0, {num_slots}) or repeated")


def packed_bounds_ok(bounds: list[int], num_tokens: int) -> bool:
    """cu_seqlens a C kernel may index packed tokens with: from 0 to num_tokens, never down."""
    return bounds[0] == 0 and bounds[-1] == num_tokens and all(a <= b for a, b in zip(bounds, bounds[1:]))


def fast_path_ok(*tensors) -> bool:
    """The C ops run only without autograd, on CPU, for float32 / bf16 storage."""
    import torch

    if torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and (t.dtype not in (torch.float32, torch.bfloat16) or t.device.type != "cpu"):
            return False
    return True
