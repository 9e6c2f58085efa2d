"""Adapter tar.gz export/import: a round trip, and every malicious archive refused unwritten."""

import gzip
import io
import json
import tarfile

import pytest
import torch
from safetensors.torch import save as save_safetensors

from kiln_ray.adapters.archive import UnsafeArchive, export_tar, import_tar
from kiln_ray.adapters.store import AdapterStore, InvalidAdapterName
from tests.adapters.test_store import assert_same_tensors, random_adapter, snapshot

MiB = 1024 * 1024
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def peft_files(tensors=None, config=None) -> dict[str, bytes]:
    default_tensors, default_config = random_adapter(seed=5)
    return {
        CONFIG: json.dumps(config or default_config).encode(),
        WEIGHTS: save_safetensors(tensors or default_tensors),
    }


def make_tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    """A tar.gz built in memory from (header, data) pairs."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def entry(name: str, data: bytes = b"", type: bytes = tarfile.REGTYPE, linkname: str = ""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = type, linkname
    return info, data


def files_tar(prefix: str = "", files: dict[str, bytes] | None = None) -> bytes:
    return make_tar([entry(prefix + name, data) for name, data in (files or peft_files()).items()])


def gzip_of_zeros(header: bytes, zeros: int) -> bytes:
    """header followed by `zeros` zero bytes, gzipped in chunks (zeros compress ~1000:1)."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=1) as gz:
        gz.write(header)
        chunk = bytes(MiB)
        for _ in range(zeros // MiB):
            gz.write(chunk)
    return buffer.getvalue()


@pytest.fixture
def store(tmp_path):
    store = AdapterStore(tmp_path / "store")
    store.save_version("kept", *random_adapter(seed=1))
    return store


def test_export_holds_only_the_peft_files_at_the_archive_root(store):
    store.save_version("kept", *random_adapter(seed=2), optimizer_state=b"state")
    data = export_tar(store, "kept")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [CONFIG, WEIGHTS]
        assert all(m.isreg() and m.mode == 0o644 for m in members)
        config = json.load(tar.extractfile(CONFIG))
    assert config == json.loads((store.version_dir("kept", 2) / CONFIG).read_text())
    assert export_tar(store, "kept", 1) != data


def test_export_then_import_round_trips_the_weights(store):
    version = import_tar(store, "copy", export_tar(store, "kept"))
    assert version == 1 and store.current_version("copy") == 1
    assert_same_tensors(store.load_version("copy").tensors, store.load_version("kept").tensors)
    assert store.load_version("copy").config == store.load_version("kept").config
    assert import_tar(store, "copy", io.BytesIO(export_tar(store, "kept"))) == 2  # a stream


@pytest.mark.parametrize(
    "members",
    [
        [entry(name, data) for name, data in peft_files().items()],
        [entry("./", type=tarfile.DIRTYPE)] + [entry("./" + n, d) for n, d in peft_files().items()],
        [entry("my-adapter", type=tarfile.DIRTYPE)]
        + [entry("my-adapter/" + n, d) for n, d in peft_files().items()],
        [entry("my-adapter/" + n, d) for n, d in peft_files().items()],
    ],
    ids=["root", "dot-prefix", "folder-with-dir-entry", "folder"],
)
def test_import_accepts_the_files_at_the_root_or_in_one_folder(store, members):
    assert import_tar(store, "up", make_tar(members)) == 1
    tensors, _ = random_adapter(seed=5)
    assert_same_tensors(store.load_version("up").tensors, tensors)


def two_gb_claimed_bomb() -> bytes:
    header = tarfile.TarInfo(WEIGHTS)
    header.size = 2 * 1024**3  # the data that follows is a few MiB of zeros
    return gzip_of_zeros(header.tobuf(tarfile.USTAR_FORMAT), 16 * MiB)


def pax_header_bomb() -> bytes:
    """A pax extended header claiming 64 MiB: tarfile reads it before yielding any member."""
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, 64 * MiB
    return gzip_of_zeros(header.tobuf(tarfile.USTAR_FORMAT), 64 * MiB)


def bad_config(**changes) -> bytes:
    tensors, config = random_adapter(seed=5)
    return files_tar(files=peft_files(tensors, {**config, **changes}))


def bad_tensors(change) -> bytes:
    tensors, config = random_adapter(seed=5)
    return files_tar(files=peft_files(change(dict(tensors)), config))


def renamed_key(tensors):
    key = next(iter(tensors))
    tensors["base_model.model.lm_head.lora_A.weight"] = tensors.pop(key)
    return tensors


def wrong_rank(tensors):
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], 3)
    return tensors


MALICIOUS = {
    "traversal": (lambda: files_tar("../"), "'..'"),
    "traversal-inside": (lambda: files_tar("a/../../"), "'..'"),
    "absolute": (lambda: make_tar([entry("/etc/x", b"x")]), "absolute"),
    "symlink": (lambda: make_tar([entry(CONFIG, type=tarfile.SYMTYPE, linkname="/etc/passwd")]),
                "not a regular file"),
    "hardlink": (lambda: make_tar([entry(CONFIG, type=tarfile.LNKTYPE, linkname="/etc/passwd")]),
                 "not a regular file"),
    "fifo": (lambda: make_tar([entry(CONFIG, type=tarfile.FIFOTYPE)]), "not a regular file"),
    "device": (lambda: make_tar([entry("dev", type=tarfile.CHRTYPE)]), "not a regular file"),
    "nested-dir": (lambda: make_tar([entry("a/b", type=tarfile.DIRTYPE)]), "nested directory"),
    "nested-files": (lambda: files_tar("a/b/"), "unexpected archive member"),
    "two-folders": (lambda: make_tar([entry("a/" + CONFIG, peft_files()[CONFIG]),
                                      entry("b/" + WEIGHTS, peft_files()[WEIGHTS])]),
                    "sit together"),
    "extra-dir": (lambda: make_tar([entry("other", type=tarfile.DIRTYPE)]
                                   + [entry(n, d) for n, d in peft_files().items()]),
                  "directories besides"),
    "extra-file": (lambda: files_tar(files={**peft_files(), "README.md": b"hi"}),
                   "unexpected archive member 'README.md'"),
    "duplicate": (lambda: make_tar([entry(CONFIG, b"{}"), entry("./" + CONFIG, b"{}")]),
                  "only one"),
    "missing-weights": (lambda: files_tar(files={CONFIG: peft_files()[CONFIG]}),
                        "missing adapter_model.safetensors"),
    "too-many-entries": (lambda: make_tar([entry("d", type=tarfile.DIRTYPE)] * 17), "more than 16"),
    "oversized": (lambda: bytes(2 * MiB), "compressed"),
    "two-gb-claimed": (two_gb_claimed_bomb, "claims 2147483648 bytes"),
    "pax-header-bomb": (pax_header_bomb, "uncompressed"),
    "not-gzip": (lambda: b"PK\x03\x04 this is a zip", "not a valid tar.gz"),
    "config-not-json": (lambda: files_tar(files={**peft_files(), CONFIG: b"{nope"}),
                        "not valid JSON"),
    "config-not-lora": (lambda: bad_config(peft_type="IA3"), "peft_type"),
    "config-rank-mismatch": (lambda: bad_config(r=8), "r = 8"),
    "weights-not-safetensors": (lambda: files_tar(files={**peft_files(), WEIGHTS: b"x" * 64}),
                                "not a valid safetensors"),
    "key-not-lora": (lambda: bad_tensors(renamed_key), "not a PEFT LoRA key"),
    "shape-mismatch": (lambda: bad_tensors(wrong_rank), "do not match"),
}


@pytest.mark.parametrize("case", MALICIOUS, ids=list(MALICIOUS))
def test_malicious_archives_are_refused_without_writing_anything(tmp_path, store, case):
    build, message = MALICIOUS[case]
    data = build()
    before = snapshot(tmp_path)
    with pytest.raises(UnsafeArchive, match=message):
        import_tar(store, "up", data, max_bytes=1 * MiB)
    assert snapshot(tmp_path) == before
    assert store.names() == ["kept"] and store.versions("kept") == [1]


def test_size_limits_hold_for_streams_and_single_members(tmp_path, store):
    data = files_tar()
    before = snapshot(tmp_path)
    with pytest.raises(UnsafeArchive, match="compressed"):
        import_tar(store, "up", io.BytesIO(data), max_bytes=len(data) - 1)
    with pytest.raises(UnsafeArchive, match="limit 100 per file"):
        import_tar(store, "up", data, max_member_bytes=100)
    with pytest.raises(UnsafeArchive, match="more than 1 entries"):
        import_tar(store, "up", data, max_entries=1)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["../evil", "a/b", "/abs", ".."])
def test_a_name_that_is_a_path_is_refused_before_reading(tmp_path, store, name):
    before = snapshot(tmp_path)
    with pytest.raises(InvalidAdapterName):
        import_tar(store, name, files_tar())
    assert snapshot(tmp_path) == before
