"""AdapterStore: PEFT layout, versions and rollback, name safety, atomic writes under failure."""

import errno
import json
import threading

import pytest
import torch

from kiln_ray.adapters import store as store_module
from kiln_ray.adapters.store import (
    AdapterNotFound,
    AdapterStore,
    AdapterStoreError,
    InvalidAdapter,
    InvalidAdapterName,
    parse_ref,
    validate_name,
    validate_new_name,
)

PREFIX = "base_model.model.model.layers"


def random_adapter(
    r: int = 4,
    modules: dict[str, tuple[int, int]] | None = None,
    layers: int = 2,
    alpha: float = 8,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT tensors + config; modules maps e.g. "self_attn.q_proj" -> (out, in)."""
    modules = modules or {"self_attn.q_proj": (16, 16), "mlp.up_proj": (24, 16)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for module, (out_features, in_features) in modules.items():
            key = f"{PREFIX}.{i}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, in_features, generator=gen)
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, r, generator=gen)
    targets = sorted({m.split(".")[1] for m in modules})
    return tensors, {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets}


def snapshot(path):
    """Every file and directory under path with its size and content, to compare before/after."""
    return {
        str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(path.rglob("*"))
    }


@pytest.fixture
def store(tmp_path):
    return AdapterStore(tmp_path / "store")


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


# --- names -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "my-adapter_v2.1", "A" * 64, "x.", "0"])
def test_valid_names_are_returned_unchanged(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", ".hidden", "a/b", "../evil", "/etc", "a\\b", "a b", "é", "a@1", "a\n",
     "A" * 65, None],
)
def test_names_that_could_be_paths_or_odd_are_refused(name):
    with pytest.raises(InvalidAdapterName):
        validate_name(name)


def test_parse_ref_splits_name_and_version():
    assert parse_ref("x@3") == ("x", 3)
    assert parse_ref("x") == ("x", None)
    for bad in ["x@", "x@0", "x@-1", "x@v2", "x@1@2", "../x@1", "@3"]:
        with pytest.raises(InvalidAdapterName):
            parse_ref(bad)


def test_a_new_adapter_may_not_take_a_name_that_model_cannot_select():
    assert validate_new_name("tower", "SmolLM2-135M-Instruct") == "tower"
    for name in ("default", "SmolLM2-135M-Instruct"):
        with pytest.raises(InvalidAdapterName, match="reserved"):
            validate_new_name(name, "SmolLM2-135M-Instruct")
    with pytest.raises(InvalidAdapterName):
        validate_new_name("../evil")


def test_an_adapter_stored_under_a_reserved_name_stays_readable_and_deletable(store):
    """Stores written before names were reserved may hold one: opening, listing and reading
    them must not fail (validate_name, which every store path goes through, accepts it)."""
    store.save_version("default", *random_adapter())
    reopened = AdapterStore(store.root)
    assert reopened.names() == ["default"]
    assert reopened.load_version("default").version == 1 and parse_ref("default@1") == ("default", 1)
    reopened.delete("default")
    assert reopened.names() == []


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.exists("../evil"),
        lambda s: s.meta("../evil"),
        lambda s: s.versions("a/b"),
        lambda s: s.load_version("../evil"),
        lambda s: s.save_version("../evil", *random_adapter()),
        lambda s: s.set_current("..", 1),
        lambda s: s.delete("."),
        lambda s: s.delete_version(".tmp", 1),
        lambda s: s.append_examples("a/b", [{}]),
        lambda s: s.load_examples("/etc"),
        lambda s: s.version_dir("../evil", 1),
        lambda s: s.version_config("../evil"),
    ],
)
def test_every_method_validates_the_name_before_touching_disk(tmp_path, call):
    store = AdapterStore(tmp_path / "store")
    before = snapshot(tmp_path)
    with pytest.raises(InvalidAdapterName):
        call(store)
    assert snapshot(tmp_path) == before


def test_a_symlink_planted_in_the_store_is_not_followed_outside(tmp_path, store):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "meta.json").write_text('{"name": "evil", "versions": {}}')
    (store.root / "evil").symlink_to(outside)
    with pytest.raises(AdapterStoreError, match="outside the store"):
        store.meta("evil")
    with pytest.raises(AdapterStoreError, match="outside the store"):
        store.save_version("evil", *random_adapter())
    assert store.names() == []
    assert [p.name for p in outside.iterdir()] == ["meta.json"]


# --- layout and versions ---------------------------------------------------------------


def test_save_writes_a_peft_directory_and_meta(store):
    tensors, config = random_adapter()
    version = store.save_version(
        "a", tensors, {**config, "base_model_name_or_path": "tiny", "kiln_job": "j1"},
        job_id="job-1", metrics={"loss": 0.5},
    )
    assert version == 1
    vdir = store.version_dir("a", 1)
    assert vdir == store.root / "a" / "v1"
    assert sorted(p.name for p in vdir.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors",
    ]
    written = json.loads((vdir / "adapter_config.json").read_text())
    assert written == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj", "up_proj"], "bias": "none", "lora_dropout": 0.0,
        "use_rslora": False, "fan_in_fan_out": False, "base_model_name_or_path": "tiny",
        "kiln_job": "j1",
    }
    meta = json.loads((store.root / "a" / "meta.json").read_text())
    assert meta["name"] == "a" and meta["current_version"] == 1
    assert meta["versions"]["1"]["job_id"] == "job-1"
    assert meta["versions"]["1"]["metrics"] == {"loss": 0.5}
    assert meta["versions"]["1"]["parent"] is None
    assert store.meta("a")["versions"][1]["created_at"] >= meta["created_at"]


def test_each_save_adds_a_version_that_becomes_current(store):
    saved = [random_adapter(seed=s) for s in range(3)]
    assert [store.save_version("a", *adapter) for adapter in saved] == [1, 2, 3]
    assert store.versions("a") == [1, 2, 3] and store.current_version("a") == 3
    loaded = store.load_version("a")
    assert (loaded.name, loaded.version, loaded.optimizer_state) == ("a", 3, None)
    assert_same_tensors(loaded.tensors, saved[2][0])
    assert_same_tensors(store.load_version("a", 1).tensors, saved[0][0])
    assert store.names() == ["a"] and store.exists("a") and not store.exists("b")


def test_dtype_and_optimizer_state_round_trip(store):
    tensors, config = random_adapter()
    tensors = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    store.save_version("a", tensors, config, optimizer_state=b"\x00opt-state")
    loaded = store.load_version("a")
    assert loaded.optimizer_state == b"\x00opt-state"
    assert_same_tensors(loaded.tensors, tensors)
    assert (store.version_dir("a", 1) / "optimizer.pt").read_bytes() == b"\x00opt-state"


def test_views_of_one_buffer_are_saved_as_separate_tensors(store):
    tensors, config = random_adapter(modules={"self_attn.q_proj": (16, 16)}, layers=1)
    buffer = torch.cat([t.flatten() for t in tensors.values()])
    views, offset = {}, 0
    for key, t in tensors.items():
        views[key] = buffer[offset: offset + t.numel()].view(t.shape)
        offset += t.numel()
    store.save_version("a", views, config)
    assert_same_tensors(store.load_version("a").tensors, tensors)
    with pytest.raises(ValueError, match="JSON"):
        store.save_version("a", views, config, metrics={"loss": torch.tensor(1.0)})
    assert store.versions("a") == [1] and list((store.root / ".tmp").iterdir()) == []


def test_version_config_is_one_versions_adapter_config(store):
    store.save_version("a", *random_adapter(r=4, alpha=8))
    store.save_version("a", *random_adapter(r=2, alpha=3))
    assert (store.version_config("a")["r"], store.version_config("a")["lora_alpha"]) == (2, 3)
    assert store.version_config("a", 1) == store.load_version("a", 1).config
    with pytest.raises(AdapterNotFound):
        store.version_config("a", 3)


def test_set_current_rolls_back_and_forward(store):
    for seed in range(3):
        store.save_version("a", *random_adapter(seed=seed))
    store.set_current("a", 1)
    assert store.current_version("a") == 1 and store.load_version("a").version == 1
    store.set_current("a", 3)
    assert store.load_version("a").version == 3
    with pytest.raises(AdapterNotFound):
        store.set_current("a", 4)


def test_parent_must_be_an_existing_version(store):
    store.save_version("a", *random_adapter())
    assert store.save_version("a", *random_adapter(seed=1), parent=1) == 2
    assert store.meta("a")["versions"][2]["parent"] == 1
    with pytest.raises(AdapterNotFound):
        store.save_version("a", *random_adapter(), parent=7)
    assert store.versions("a") == [1, 2]


def test_delete_version_refuses_the_current_one_and_numbers_are_never_reused(store):
    for seed in range(3):
        store.save_version("a", *random_adapter(seed=seed))
    with pytest.raises(AdapterStoreError, match="current version"):
        store.delete_version("a", 3)
    store.set_current("a", 2)
    store.delete_version("a", 3)
    assert store.versions("a") == [1, 2] and not (store.root / "a" / "v3").exists()
    assert store.save_version("a", *random_adapter(seed=9)) == 4


def test_delete_removes_the_adapter(store):
    store.save_version("a", *random_adapter())
    store.save_version("b", *random_adapter())
    store.delete("a")
    assert store.names() == ["b"] and not (store.root / "a").exists()
    with pytest.raises(AdapterNotFound):
        store.load_version("a")


def test_unknown_names_and_versions_raise_a_readable_adapter_not_found(store):
    with pytest.raises(AdapterNotFound) as info:
        store.load_version("nope")
    assert isinstance(info.value, KeyError)
    assert str(info.value) == "adapter 'nope' not found"
    store.save_version("a", *random_adapter())
    with pytest.raises(AdapterNotFound, match=r"has no version 5 \(versions: \[1\]\)"):
        store.load_version("a", 5)
    for call in (lambda: store.version_dir("a", 2), lambda: store.delete_version("a", 2),
                 lambda: store.delete("b"), lambda: store.append_examples("b", [])):
        with pytest.raises(AdapterNotFound):
            call()


def test_save_refuses_tensors_that_are_not_a_peft_lora_adapter(store):
    tensors, config = random_adapter()
    key_a = next(k for k in tensors if k.endswith("lora_A.weight"))
    bad = [
        ({**tensors, "model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)}, config),
        ({k: v for k, v in tensors.items() if k != key_a}, config),
        ({**tensors, key_a: torch.zeros(3, 16)}, config),
        (tensors, {**config, "r": 8}),
        (tensors, {**config, "target_modules": ["q_proj"]}),
        (tensors, {**config, "peft_type": "IA3"}),
        ({}, config),
    ]
    for t, c in bad:
        with pytest.raises(InvalidAdapter):
            store.save_version("a", t, c)
    assert not store.exists("a")


# --- examples --------------------------------------------------------------------------


def test_examples_are_appended_and_read_back_in_order(store):
    store.save_version("a", *random_adapter())
    assert store.load_examples("a") == []
    store.append_examples("a", [{"messages": [{"role": "user", "content": "hé"}]}])
    store.append_examples("a", [{"i": 1}, {"i": 2}])
    assert store.load_examples("a") == [
        {"messages": [{"role": "user", "content": "hé"}]}, {"i": 1}, {"i": 2},
    ]
    with pytest.raises(ValueError):
        store.append_examples("a", ["not a dict"])
    assert len(store.load_examples("a")) == 3


def test_examples_saved_with_a_version_appear_with_it(store):
    store.save_version("a", *random_adapter(), examples=[{"i": 0}])
    store.save_version("a", *random_adapter(), examples=[{"i": 1}, {"i": 2}])
    store.save_version("a", *random_adapter())
    assert store.load_examples("a") == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert store.meta("a")["examples_bytes"] == (store.root / "a" / "examples.jsonl").stat().st_size


def test_an_uncommitted_examples_tail_is_invisible_and_cut_by_the_next_append(tmp_path, monkeypatch):
    """A crash after the examples were appended but before meta.json was replaced."""
    store = AdapterStore(tmp_path / "store")
    store.save_version("a", *random_adapter(), examples=[{"i": 0}])
    committed = (store.root / "a" / "examples.jsonl").read_bytes()
    def crash(*args):
        raise Crash()

    with monkeypatch.context() as m:
        m.setattr(AdapterStore, "_write_meta", crash)
        with pytest.raises(Crash):
            store.save_version("a", *random_adapter(seed=2), examples=[{"i": "lost"}])
    assert (store.root / "a" / "examples.jsonl").read_bytes() != committed  # the tail is there
    reopened = AdapterStore(tmp_path / "store")
    assert reopened.load_examples("a") == [{"i": 0}] and reopened.versions("a") == [1]
    reopened.append_examples("a", [{"i": 1}])
    assert reopened.load_examples("a") == [{"i": 0}, {"i": 1}]
    assert (store.root / "a" / "examples.jsonl").read_bytes() == committed + b'{"i": 1}\n'


def test_a_store_written_before_examples_bytes_reads_and_extends_the_whole_file(store):
    store.save_version("a", *random_adapter())
    meta_path = store.root / "a" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["examples_bytes"]
    meta_path.write_text(json.dumps(meta))
    (store.root / "a" / "examples.jsonl").write_text('{"i": 0}\n')
    assert store.load_examples("a") == [{"i": 0}]
    store.save_version("a", *random_adapter(), examples=[{"i": 1}])
    assert store.load_examples("a") == [{"i": 0}, {"i": 1}]


def fsync_failing_on(directory, call: int):
    """A `_fsync_dir` stand-in that fails (EIO) the `call`-th time it syncs `directory`."""
    real_fsync, calls = store_module._fsync_dir, []

    def fsync_dir(path):
        if path == directory:
            calls.append(path)
            if len(calls) == call:
                raise OSError(errno.EIO, "Input/output error")
        real_fsync(path)
    return fsync_dir


def test_a_version_whose_rename_cannot_be_made_durable_is_not_left_behind(store, monkeypatch):
    store.save_version("a", *random_adapter(seed=1))
    before = snapshot(store.root)
    monkeypatch.setattr(store_module, "_fsync_dir", fsync_failing_on(store.root / "a", call=1))
    with pytest.raises(AdapterStoreError, match="Input/output error"):
        store.save_version("a", *random_adapter(seed=2))
    assert snapshot(store.root) == before


def test_a_failed_fsync_after_the_meta_commit_keeps_the_committed_version(store, monkeypatch):
    """Once meta.json lists the new version, undoing the version directory would leave meta.json
    pointing at nothing: the save stands (a power loss may bring back the old, consistent state)."""
    store.save_version("a", *random_adapter(seed=1))
    tensors, config = random_adapter(seed=2)
    monkeypatch.setattr(store_module, "_fsync_dir", fsync_failing_on(store.root / "a", call=2))
    assert store.save_version("a", tensors, config) == 2
    assert store.current_version("a") == 2
    assert_same_tensors(store.load_version("a").tensors, tensors)


# --- atomicity -------------------------------------------------------------------------


def half_written_then(error):
    """A `_write_bytes` stand-in that writes half of the weights file, then fails like a full
    disk would (other files are written)."""
    real_write = store_module._write_bytes

    def write_bytes(path, data):
        if path.name != "adapter_model.safetensors":
            return real_write(path, data)
        with open(path, "xb") as f:
            f.write(data[: len(data) // 2])
        raise error
    return write_bytes


def test_disk_full_while_writing_weights_keeps_the_old_version_current(store, monkeypatch):
    old_tensors, config = random_adapter(seed=1)
    store.save_version("a", old_tensors, config)
    before = snapshot(store.root)
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(store_module, "_write_bytes", half_written_then(disk_full))
    with pytest.raises(AdapterStoreError, match="disk full") as info:
        store.save_version("a", *random_adapter(seed=2))
    assert "unchanged" in str(info.value)
    assert snapshot(store.root) == before  # no staging leftovers either
    assert store.versions("a") == [1] and store.current_version("a") == 1
    assert_same_tensors(store.load_version("a").tensors, old_tensors)


def test_disk_full_on_a_new_adapter_leaves_no_trace(store, monkeypatch):
    before = snapshot(store.root)
    monkeypatch.setattr(store_module, "_write_bytes", half_written_then(OSError(errno.ENOSPC, "full")))
    with pytest.raises(AdapterStoreError):
        store.save_version("a", *random_adapter())
    assert snapshot(store.root) == before and store.names() == []


def test_disk_full_while_replacing_meta_or_examples_changes_nothing(store, monkeypatch):
    old_tensors, config = random_adapter(seed=1)
    store.save_version("a", old_tensors, config)
    before = snapshot(store.root)
    real_write = store_module._write_bytes

    def write_bytes(path, data):  # files staged directly in .tmp: meta.json and examples
        if path.parent == store.root / ".tmp":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(store_module, "_write_bytes", write_bytes)
    with pytest.raises(AdapterStoreError, match="disk full"):
        store.save_version("a", *random_adapter(seed=2))
    with pytest.raises(AdapterStoreError, match="disk full"):
        store.append_examples("a", [{"i": 1}])
    assert snapshot(store.root) == before
    assert store.current_version("a") == 1
    assert_same_tensors(store.load_version("a").tensors, old_tensors)


class Crash(BaseException):
    """The process dying mid-write: nothing below it gets to clean up."""


def test_a_crash_mid_save_is_invisible_and_cleaned_on_reopen(tmp_path, monkeypatch):
    store = AdapterStore(tmp_path / "store")
    old_tensors, config = random_adapter(seed=1)
    store.save_version("a", old_tensors, config)
    with monkeypatch.context() as m:
        m.setattr(store_module, "_write_bytes", half_written_then(Crash()))
        with pytest.raises(Crash):
            store.save_version("a", *random_adapter(seed=2))
    assert any((store.root / ".tmp").iterdir())  # the half-written version sits in staging
    assert store.versions("a") == [1]
    assert_same_tensors(store.load_version("a").tensors, old_tensors)
    # A crash after the rename but before meta.json: a complete v2 that meta does not list.
    (store.root / "a" / "v2").mkdir()
    reopened = AdapterStore(tmp_path / "store")
    assert list((reopened.root / ".tmp").iterdir()) == []
    assert sorted(p.name for p in (reopened.root / "a").iterdir()) == ["meta.json", "v1"]
    assert reopened.save_version("a", *random_adapter(seed=3)) == 2


def test_a_read_only_store_neither_writes_nor_clears_staging(tmp_path):
    AdapterStore(tmp_path / "store").save_version("a", *random_adapter())
    staging = tmp_path / "store" / ".tmp" / "in-progress"
    staging.mkdir()
    reader = AdapterStore(tmp_path / "store", read_only=True)
    assert staging.exists() and reader.names() == ["a"]
    assert reader.load_version("a").version == 1
    with pytest.raises(AdapterStoreError, match="read-only"):
        reader.save_version("a", *random_adapter())
    assert AdapterStore(tmp_path / "missing", read_only=True).names() == []
    assert not (tmp_path / "missing").exists()


def test_concurrent_saves_from_threads_get_distinct_versions(store):
    results: list[int] = []

    def save(seed):
        results.append(store.save_version("a", *random_adapter(seed=seed)))

    threads = [threading.Thread(target=save, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [1, 2, 3, 4, 5, 6]
    assert store.versions("a") == [1, 2, 3, 4, 5, 6] and store.current_version("a") in results
