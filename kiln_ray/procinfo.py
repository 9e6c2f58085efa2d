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
