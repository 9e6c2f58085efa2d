"""Process facts for health reports and measurements."""

from __future__ import annotations


def process_memory(pid: int) -> dict:
    """rss / pss / uss (private) / shared bytes of a process, from /proc (Linux)."""
    fields = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if rest.strip().endswith("kB"):
                    fields[key] = int(rest.split()[0]) * 1024
    except OSError:
        return {"pid": pid}
    return {
        "pid": pid,
        "rss": fields.get("Rss", 0),
        "pss": fields.get("Pss", 0),
        "uss": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
        "shared": fields.get("Shared_Clean", 0) + fields.get("Shared_Dirty", 0),
    }


def release_freed_memory() -> bool:
    """Hand the heap's freed pages back to the OS (glibc's malloc_trim). A training job frees
    hundreds of MiB of activations, which glibc otherwise keeps: measured on SmolLM2, eight
    GRPO jobs in one process grew it from 0.6 to 2.5 GiB RSS; trimmed after each job it was
    0.9 GiB after six. False where there is no glibc."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
