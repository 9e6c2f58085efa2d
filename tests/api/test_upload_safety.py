"""Hostile uploads through the real route, `POST /v1/adapters/upload`, end to end: each is a
4xx with an OpenAI-style error body (never a 500), and nothing is written anywhere.

The whole filesystem the server can reach in these tests sits under one temporary root:

    <root>/home/             KILN home: adapters/ (the store), state/
    <root>/outside/secret    the target every link and absolute path in the archives aims at
    <root>/spool/            the temp dir (`tempfile.tempdir`) the multipart parser spools to

and every refused upload must leave that root exactly as it was, byte for byte (the secret's
inode and link count too). A valid upload may only add files under `home/adapters/<name>/`.
"""

import hashlib
import io
import json
import os
import stat
import tarfile
import tempfile
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from tests.adapters.test_archive import entry, gzip_of_zeros, make_tar
from tests.api.server import make_app

MiB = 1024 * 1024
LIMIT = 1 * MiB  # training.upload_max_bytes of this server
SLACK = 64 * 1024  # the route's allowance for the multipart framing around the file
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
CONV = [{"role": "user", "content": "Who built the Zorblatt tower?"},
        {"role": "assistant", "content": "Edda Brask built it."}]


@pytest.fixture(scope="module")
def site(tiny_smol_dir, tmp_path_factory):
    """(client, root, the valid archive of the trained adapter `kept`)."""
    root = tmp_path_factory.mktemp("upload-root")
    (root / "outside").mkdir()
    (root / "outside" / "secret").write_bytes(b"do not touch\n")
    (root / "spool").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(root / "spool"))
        app, engine = make_app(tiny_smol_dir, home=root / "home", training={"upload_max_bytes": LIMIT})
        with TestClient(app) as client:
            r = client.post("/v1/train/sft", json={"adapter": "kept", "examples": [{"messages": CONV}],
                                                   "config": {"steps": 2, "early_stop_loss": None}})
            assert r.status_code == 200, r.text
            engine.service.stop()  # drains the queue: the job has finished, the trainer is idle
            assert client.get(f"/v1/train/status/{r.json()['job_id']}").json()["state"] == "completed"
            valid = client.get("/v1/adapters/kept/download").content
            assert len(valid) < LIMIT
            yield client, root, valid
        engine.shutdown()


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under root, links not followed: its kind and content (digest, link target)."""
    entries = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory) / name
            info = path.lstat()
            key = str(path.relative_to(root))
            if stat.S_ISLNK(info.st_mode):
                entries[key] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                entries[key] = ("dir",)
            elif stat.S_ISREG(info.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                entries[key] = ("file", info.st_size, info.st_nlink, info.st_ino, digest)
            else:
                entries[key] = ("special", stat.S_IFMT(info.st_mode))
    return entries


def upload(client, data: bytes, name: str = "up", activate: str = "true") -> httpx.Response:
    return client.post("/v1/adapters/upload", files={"file": ("a.tar.gz", data, "application/gzip")},
                       data={"name": name, "activate": activate})


def multipart(data: bytes, name: str = "up") -> tuple[bytes, str]:
    """The body and content type `upload` would send, for requests built by hand."""
    request = httpx.Request("POST", "http://testserver/", files={"file": ("a.tar.gz", data)}, data={"name": name})
    return request.read(), request.headers["content-type"]


def assert_refused(response: httpx.Response, status: int, message: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and isinstance(error["type"], str)
    assert message in error["message"], error["message"]


# --- archives ---------------------------------------------------------------------------------


def peft_members(valid: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(valid), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def tar_of(files: dict[str, bytes], prefix: str = "") -> bytes:
    return make_tar([entry(prefix + name, data) for name, data in files.items()])


def reshaped(valid: bytes) -> bytes:
    """The valid adapter with every module's input dimension halved: a well-formed PEFT adapter
    (consistent ranks) for a different base model."""
    files = peft_members(valid)
    tensors = load_safetensors(files[WEIGHTS])
    tensors = {k: t[:, : t.shape[1] // 2].contiguous() if ".lora_A." in k else t for k, t in tensors.items()}
    return tar_of({**files, WEIGHTS: save_safetensors(tensors)})


def rslora(valid: bytes) -> bytes:
    """Valid for PEFT and the store, but rsLoRA, which this server cannot serve."""
    files = peft_members(valid)
    config = {**json.loads(files[CONFIG]), "use_rslora": True}
    return tar_of({**files, CONFIG: json.dumps(config).encode()})


def bomb(header: tarfile.TarInfo, expands_to: int) -> bytes:
    """A tar header followed by `expands_to` zero bytes, gzipped (about 220:1)."""
    data = gzip_of_zeros(header.tobuf(tarfile.USTAR_FORMAT), expands_to)
    assert len(data) < LIMIT  # small on the wire: only the expansion is large
    return data


def claimed_bomb(size: int) -> bytes:
    header = tarfile.TarInfo(WEIGHTS)
    header.size = size
    return bomb(header, 64 * MiB)


def pax_bomb() -> bytes:
    """A pax extended header of 64 MiB: tarfile reads it whole before yielding any member."""
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, 64 * MiB
    return bomb(header, 64 * MiB)


def link_then_write(kind: bytes, target: str) -> list:
    """A link named like a PEFT file, then a regular file of the same name: extracting this
    naively would write through the link into the target."""
    return [entry(WEIGHTS, type=kind, linkname=target), entry(WEIGHTS, b"overwritten\n")]


# Each case: (archive builder taking (valid archive, root), name, status, message fragment).
CASES = {
    "traversal": (lambda v, root: tar_of(peft_members(v), "../"), "up", 400, "'..'"),
    "traversal-inside": (lambda v, root: tar_of(peft_members(v), "a/../../"), "up", 400, "'..'"),
    "absolute": (lambda v, root: tar_of(peft_members(v), f"{root}/outside/"), "up", 400, "absolute"),
    "symlink-absolute": (lambda v, root: make_tar(
        [entry(WEIGHTS, type=tarfile.SYMTYPE, linkname=f"{root}/outside/secret")]), "up", 400, "not a regular"),
    "symlink-relative": (lambda v, root: make_tar(
        [entry(WEIGHTS, type=tarfile.SYMTYPE, linkname="../../../outside/secret")]), "up", 400, "not a regular"),
    "symlink-dir-then-file": (lambda v, root: make_tar(
        [entry("d", type=tarfile.SYMTYPE, linkname=f"{root}/outside"), entry("d/" + CONFIG, b"{}")]),
        "up", 400, "not a regular"),
    "symlink-then-write": (lambda v, root: make_tar(link_then_write(tarfile.SYMTYPE, f"{root}/outside/secret")),
                           "up", 400, "not a regular"),
    "hardlink-then-write": (lambda v, root: make_tar(link_then_write(tarfile.LNKTYPE, f"{root}/outside/secret")),
                            "up", 400, "not a regular"),
    "hardlink-relative": (lambda v, root: make_tar(
        [entry(CONFIG, type=tarfile.LNKTYPE, linkname="../outside/secret")]), "up", 400, "not a regular"),
    "char-device": (lambda v, root: make_tar([entry(WEIGHTS, type=tarfile.CHRTYPE)]), "up", 400, "not a regular"),
    "block-device": (lambda v, root: make_tar([entry(WEIGHTS, type=tarfile.BLKTYPE)]), "up", 400, "not a regular"),
    "fifo": (lambda v, root: make_tar([entry(CONFIG, type=tarfile.FIFOTYPE)]), "up", 400, "not a regular"),
    "bomb-claimed-64mib": (lambda v, root: claimed_bomb(64 * MiB), "up", 400, "claims 67108864 bytes"),
    "bomb-claimed-2gib": (lambda v, root: claimed_bomb(2 * 1024**3), "up", 400, "claims 2147483648 bytes"),
    "bomb-pax-header": (lambda v, root: pax_bomb(), "up", 400, f"exceeds {LIMIT} bytes uncompressed"),
    "zeros-not-a-tar": (lambda v, root: gzip_of_zeros(b"", 64 * MiB), "up", 400, "missing"),
    "too-many-entries": (lambda v, root: make_tar([entry(f"d{i}", type=tarfile.DIRTYPE) for i in range(1000)]),
                         "up", 400, "more than 16 entries"),
    "missing-config": (lambda v, root: tar_of({WEIGHTS: peft_members(v)[WEIGHTS]}), "up", 400,
                       "missing adapter_config.json"),
    "not-gzip": (lambda v, root: b"PK\x03\x04 a zip", "up", 400, "not a valid tar.gz"),
    "wrong-shapes-new-name": (lambda v, root: reshaped(v), "up", 400, "do not fit this model"),
    "wrong-shapes-existing-name": (lambda v, root: reshaped(v), "kept", 400, "do not fit this model"),
    "rslora-existing-name": (lambda v, root: rslora(v), "kept", 400, "rsLoRA"),
    # A name that is a path, empty, too long or a look-alike, with a valid archive.
    **{f"name-{i}-{label}": (lambda v, root: v, name, 400, "invalid adapter name") for i, (label, name) in enumerate([
        ("dotdot-slash", "../evil"), ("slash", "a/b"), ("absolute", "/etc"), ("empty", ""),
        ("dotdot", ".."), ("hidden", ".kept"), ("65-chars", "a" * 65), ("backslash", "..\\evil"),
        ("nul", "kept\x00"), ("newline", "kept\n"), ("cyrillic-a", "\u0430dapter"),
        ("fullwidth", "\uff4bept"), ("division-slash", "a\u2215b"), ("fraction-slash", "..\u2044evil"),
        ("fullwidth-dots", "\uff0e\uff0e"), ("zero-width", "kept\u200b"),
    ])},
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_a_hostile_upload_is_refused_and_writes_nothing(site, case):
    client, root, valid = site
    build, name, status, message = CASES[case]
    data = build(valid, root)
    before = tree(root)
    assert_refused(upload(client, data, name), status, message)
    assert tree(root) == before
    assert (root / "outside" / "secret").read_bytes() == b"do not touch\n"
    assert [a["name"] for a in client.get("/v1/adapters").json()["adapters"]] == ["kept"]
    assert client.get("/v1/adapters").json()["default_adapter"] is None


# --- sizes ------------------------------------------------------------------------------------


def test_an_upload_over_the_limit_is_refused_with_an_honest_length(site):
    client, root, _ = site
    before = tree(root)
    assert_refused(upload(client, os.urandom(LIMIT + SLACK + 1)), 413, f"larger than {LIMIT} bytes")
    assert_refused(upload(client, os.urandom(LIMIT + 1)), 413, f"larger than {LIMIT} bytes")  # within the slack
    assert tree(root) == before


def test_a_body_without_a_length_or_longer_than_its_length_is_refused(site):
    """A chunked body (no Content-Length) is refused before it is read; a body that runs past
    the Content-Length it declared is refused as soon as it does, before it is spooled."""
    client, root, _ = site
    body, content_type = multipart(os.urandom(4 * MiB))
    before = tree(root)
    chunked = client.post("/v1/adapters/upload", content=iter([body]), headers={"content-type": content_type})
    assert chunked.request.headers["transfer-encoding"] == "chunked"
    assert_refused(chunked, 411, "Content-Length")
    for chunks in ([body], [body[i: i + 64 * 1024] for i in range(0, len(body), 64 * 1024)]):
        lying = client.post("/v1/adapters/upload", content=iter(chunks),
                            headers={"content-type": content_type, "content-length": "1000"})
        assert_refused(lying, 400, "longer than its Content-Length")
    assert tree(root) == before


# --- what a valid upload may touch ------------------------------------------------------------


@pytest.mark.parametrize("name", ["copy", "kept"])
def test_a_valid_upload_writes_only_inside_its_adapter_folder(site, name):
    client, root, valid = site
    before = tree(root)
    r = upload(client, valid, name, activate="false")
    assert r.status_code == 200, r.text
    after = tree(root)
    changed = {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}
    folder = f"home/adapters/{name}"
    assert changed and all(p == folder or p.startswith(folder + "/") for p in changed), sorted(changed)
    assert not os.listdir(root / "home" / "adapters" / ".tmp")
    tensors = load_safetensors(peft_members(valid)[WEIGHTS])
    stored = load_safetensors((root / "home/adapters" / name / f"v{r.json()['version']}" / WEIGHTS).read_bytes())
    assert stored.keys() == tensors.keys() and all(torch.equal(stored[k], tensors[k]) for k in tensors)
