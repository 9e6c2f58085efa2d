"""kiln_ray/procinfo.py: what the trainer does after each job to give freed memory back."""

import gc
import os
import platform

import pytest

from kiln_ray.procinfo import release_freed_memory


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_freed_heap_memory_goes_back_to_the_os():
    """Blocks small enough for the heap, nine in ten freed and every tenth kept (so the heap
    cannot simply shrink from its top): glibc keeps the freed pages until trimmed."""
    blocks = [bytearray(b"x" * 16_000) for _ in range(12_000)]  # ~190 MB
    kept = blocks[::10]
    del blocks
    gc.collect()
    before = _rss_mib()
    assert release_freed_memory()
    after = _rss_mib()
    assert before - after > 80, f"RSS {before:.0f} -> {after:.0f} MiB"
    assert len(kept) == 1200
