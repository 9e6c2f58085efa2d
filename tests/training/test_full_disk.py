"""A full disk while an adapter is saved: the save commits everything or nothing, a training
job fails with the reason, the previous version stays current and keeps serving, and the next
job (once there is room again) succeeds.

The disk is real: a small tmpfs mounted over the adapter store, filled by one preallocated
file so that exactly the room a case wants stays free (tmpfs counts whole pages). Where
mounting is not allowed, the same tests run on a simulated disk instead of being skipped: the
store's two file writers (`_write_bytes`, `_write_at`) get a byte budget, and the write that
overruns it stores what fits and raises ENOSPC, as the kernel would.
"""

import errno
import os
import subprocess
import time
import warnings
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kiln_ray.adapters import store as store_module
from kiln_ray.adapters.store import AdapterStore, AdapterStoreError
from tests.adapters.test_store import assert_same_tensors, random_adapter, snapshot
from tests.api.conftest import tiny_smol_dir  # noqa: F401 (a fixture)
from tests.api.server import make_app

MiB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")


class TmpfsDisk:
    """A tmpfs of `size` bytes mounted at `path`; `fill(leaving=n)` leaves n bytes free."""

    kind = "tmpfs"

    def __init__(self, path: Path, size: int):
        self.path, self.filler = path, path / ".filler"
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise PermissionError(result.stderr.strip() or "mount failed")

    def footprint(self, nbytes: int) -> int:
        """The free space a file of `nbytes` takes."""
        return -(-nbytes // PAGE) * PAGE

    def fill(self, leaving: int) -> None:
        self.empty()
        stats = os.statvfs(self.path)
        fd = os.open(self.filler, os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            os.posix_fallocate(fd, 0, stats.f_bavail * stats.f_frsize - leaving)
        finally:
            os.close(fd)
        stats = os.statvfs(self.path)
        assert stats.f_bavail * stats.f_frsize == leaving

    def empty(self) -> None:
        self.filler.unlink(missing_ok=True)

    def close(self) -> None:
        if subprocess.run(["umount", str(self.path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(self.path)], check=True)


class SimulatedDisk:
    """The store's file writers with a byte budget (None: unlimited)."""

    kind = "simulated"

    def __init__(self, path: Path, patch: pytest.MonkeyPatch):
        self.path, self.room = path, None
        write_bytes, write_at = store_module._write_bytes, store_module._write_at
        patch.setattr(store_module, "_write_bytes", lambda path, data: self._spend(data, write_bytes, path))
        patch.setattr(store_module, "_write_at",
                      lambda path, offset, data: self._spend(data, write_at, path, offset))

    def _spend(self, data: bytes, write, *args) -> None:
        if self.room is None or len(data) <= self.room:
            self.room = None if self.room is None else self.room - len(data)
            return write(*args, data)
        write(*args, data[: self.room])
        self.room = 0
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    def footprint(self, nbytes: int) -> int:
        return nbytes

    def fill(self, leaving: int) -> None:
        self.room = leaving

    def empty(self) -> None:
        self.room = None

    def close(self) -> None:
        pass


def small_disk(path: Path, size: int, kind: str, patch: pytest.MonkeyPatch) -> TmpfsDisk | SimulatedDisk:
    if kind == "tmpfs":
        try:
            return TmpfsDisk(path, size)
        except OSError as error:  # not root, no CAP_SYS_ADMIN, no mount(8)
            warnings.warn(f"cannot mount a tmpfs ({error}); simulating the full disk instead", stacklevel=2)
    return SimulatedDisk(path, patch)


# --- the store: every place a save can run out of space ---------------------------------------


@pytest.fixture(params=["tmpfs", "simulated"])
def disk(request, tmp_path):
    (tmp_path / "disk").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        disk = small_disk(tmp_path / "disk", 1 * MiB, request.param, patch)
        try:
            yield disk
        finally:
            disk.close()


def examples_of(job: str) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"question {i} of {job}"}], "job_id": job} for i in range(3)]


@pytest.mark.parametrize("existing", [True, False], ids=["next-version", "new-adapter"])
def test_a_save_that_runs_out_of_space_anywhere_commits_all_or_nothing(disk, existing):
    """Sweep the free space from nothing to enough, a page (or 256 bytes) at a time: each save
    either fails with "disk full" and leaves the store as it was, byte for byte (no staging
    leftovers, no half-written version, no examples of the failed save), or commits the version
    with its examples."""
    store = AdapterStore(disk.path / "store")
    old_tensors, config = random_adapter(seed=1)
    if existing:
        store.save_version("a", old_tensors, config, optimizer_state=os.urandom(3 * PAGE),
                           examples=examples_of("job-1"))
    before = snapshot(store.root / "a") if existing else {}
    new_tensors, _ = random_adapter(seed=2)
    step = PAGE if disk.kind == "tmpfs" else 256
    failures, version = 0, None
    for room in range(0, 64 * PAGE, step):
        try:
            disk.fill(leaving=room)
            version = store.save_version("a", new_tensors, config, parent=1 if existing else None,
                                         optimizer_state=os.urandom(3 * PAGE), examples=examples_of("job-2"))
        except AdapterStoreError as error:
            failures += 1
            assert "disk full" in str(error) and "unchanged" in str(error)
            assert (snapshot(store.root / "a") if (store.root / "a").exists() else {}) == before, room
            assert list((store.root / ".tmp").iterdir()) == []
            continue
        finally:
            disk.empty()
        break
    print(f"\n{disk.kind} disk, {'next version' if existing else 'new adapter'}: free space swept from 0 "
          f"in steps of {step} bytes; {failures} saves failed with 'disk full' and left the store "
          f"unchanged, the save with {room} bytes free committed v{version}")
    assert failures >= 4 and version == (2 if existing else 1)  # it failed at several writes, then fit
    reopened = AdapterStore(store.root)  # and a fresh writer finds nothing to clean up
    assert reopened.current_version("a") == version
    assert_same_tensors(reopened.load_version("a").tensors, new_tensors)
    jobs = [e["job_id"] for e in reopened.load_examples("a")]
    assert jobs == (["job-1"] * 3 if existing else []) + ["job-2"] * 3


# --- a training job through the server --------------------------------------------------------

CONV = [{"role": "user", "content": "Who built the Zorblatt tower?"},
        {"role": "assistant", "content": "Edda Brask built it."}]
ASK = [{"role": "user", "content": "Who built the Zorblatt tower?"}]


@pytest.fixture(scope="module")
def server(tiny_smol_dir, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    """(client, small disk, adapter store root): an in-process server whose adapter store is
    the small disk."""
    home = tmp_path_factory.mktemp("full-disk-home")
    (home / "adapters").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        disk = small_disk(home / "adapters", 16 * MiB, "tmpfs", patch)
        try:
            app, engine = make_app(tiny_smol_dir, home=home)
            with TestClient(app) as client:
                yield client, disk, home / "adapters"
            engine.service.stop()
            engine.shutdown()
        finally:
            disk.close()


def train(http, adapter: str) -> dict:
    """A job of 24 examples: their examples.jsonl lines span several pages."""
    r = http.post("/v1/train/sft", json={"adapter": adapter, "examples": [{"messages": CONV}] * 24,
                                         "config": {"steps": 2, "learning_rate": 0.01, "early_stop_loss": None}})
    assert r.status_code == 200, r.text
    deadline = time.time() + 60
    while time.time() < deadline:
        status = http.get(f"/v1/train/status/{r.json()['job_id']}").json()
        if status["state"] in ("completed", "failed", "cancelled"):
            return status
        time.sleep(0.05)
    raise AssertionError(status)


def answer(http, model: str) -> str:
    r = http.post("/v1/chat/completions", json={"model": model, "messages": ASK, "max_tokens": 8,
                                                "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def listing(http, name: str) -> dict:
    return next(a for a in http.get("/v1/adapters").json()["adapters"] if a["name"] == name)


VERSION_FILES = ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt")
# How much stays free while the second job saves, from the sizes of its first version. None
# is enough for the version, its examples and meta.json. The last case has room for the version
# and meta.json: a save that wrote the examples after committing the version would commit v2
# and then fail.
ROOM = {
    "nothing": lambda disk, sizes: 0,
    "half-the-weights": lambda disk, sizes: disk.footprint(sizes["adapter_config.json"])
    + disk.footprint(sizes["adapter_model.safetensors"] // 2),
    "half-the-optimizer": lambda disk, sizes: disk.footprint(sizes["adapter_config.json"])
    + disk.footprint(sizes["adapter_model.safetensors"]) + disk.footprint(sizes["optimizer.pt"] // 2),
    "the-version-only": lambda disk, sizes: sum(disk.footprint(sizes[f]) for f in VERSION_FILES),
    "the-version-and-meta": lambda disk, sizes: sum(disk.footprint(sizes[f]) for f in VERSION_FILES)
    + disk.footprint(sizes["meta.json"] + 1024),  # v2's meta.json is a little longer
}


@pytest.mark.parametrize("room", ROOM, ids=list(ROOM))
def test_a_full_disk_fails_the_job_and_the_old_version_keeps_serving(server, room):
    http, disk, store_root = server
    name = f"fact-{room}"
    first = train(http, name)
    assert first["state"] == "completed" and first["adapter_version"] == 1, first
    served = answer(http, name)
    before = snapshot(store_root / name)  # meta.json, examples.jsonl, v1/*: every byte
    sizes = {p.name: p.stat().st_size for p in (store_root / name / "v1").iterdir()}
    sizes["meta.json"] = (store_root / name / "meta.json").stat().st_size
    assert sorted(sizes) == sorted([*VERSION_FILES, "meta.json"])
    assert (store_root / name / "examples.jsonl").stat().st_size > 3 * PAGE

    try:
        disk.fill(leaving=ROOM[room](disk, sizes))
        second = train(http, name)
    finally:
        disk.empty()
    assert second["state"] == "failed" and second["adapter_version"] is None, second
    assert list((store_root / ".tmp").iterdir()) == []
    assert "saving the adapter failed" in second["error"] and "disk full" in second["error"], second["error"]
    assert snapshot(store_root / name) == before  # no v2, no examples of job 2, meta.json unchanged
    assert answer(http, name) == served
    assert (listing(http, name)["current_version"], listing(http, name)["serving_version"]) == (1, 1)

    print(f"\n{disk.kind} disk, {room} free ({ROOM[room](disk, sizes)} bytes): the job failed "
          f"({second['error']}); v1 byte for byte intact and serving")
    third = train(http, name)  # there is room again
    assert third["state"] == "completed" and third["adapter_version"] == 2, third
    assert answer(http, f"{name}@1") == served and answer(http, name) == answer(http, f"{name}@2")
    jobs = [e["job_id"] for e in AdapterStore(store_root, read_only=True).load_examples(name)]
    assert jobs == [first["job_id"]] * 24 + [third["job_id"]] * 24  # none of the failed job's
