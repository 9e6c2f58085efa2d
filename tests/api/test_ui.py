"""GET /ui: one static page served by the API app itself, its files shipped in the package,
open without a key, and loading nothing from anywhere else. (tests/e2e/test_ui.py drives it in
a real browser against Ray Serve.)"""

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.api.server import make_app

ROOT = Path(__file__).resolve().parents[2]
UI_DIR = ROOT / "kiln_ray" / "api" / "ui"
MEDIA = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def referenced_assets() -> set[str]:
    """Every /ui file the page loads: the index's src/href, then each module's imports."""
    index = (UI_DIR / "index.html").read_text()
    found = set(re.findall(r'(?:src|href)="/ui/([^"]+)"', index))
    todo = [name for name in found if name.endswith(".js")]
    while todo:
        for name in re.findall(r'from "\./([^"]+)"', (UI_DIR / todo.pop()).read_text()):
            if name not in found:
                found.add(name)
                todo.append(name)
    return found


@pytest.mark.parametrize("path", ["/ui", "/ui/"])
def test_the_page_is_served_as_html(http, path):
    r = http.get(path)
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script type="module" src="/ui/app.js">' in r.text
    assert 'data-testid="status-model"' in r.text


def test_every_file_the_page_loads_is_served_with_its_content_type(http):
    assets = referenced_assets()
    assert {"app.js", "style.css", "api.js", "chat.js", "charts.js", "metrics.js", "training.js", "adapters.js"} <= assets
    for name in assets:
        r = http.get(f"/ui/{name}")
        assert r.status_code == 200, name
        assert r.headers["content-type"].split(";")[0] == MEDIA[Path(name).suffix], name
        assert r.content == (UI_DIR / name).read_bytes()
        assert r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", ["/ui/missing.js", "/ui/..%2Fui.py", "/ui/ui.py"])
def test_only_the_ui_files_are_served(http, path):
    r = http.get(path)
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found_error"


def test_the_ui_routes_stay_out_of_the_api_schema(http):
    paths = http.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith("/ui")]


def test_the_page_loads_nothing_from_other_hosts():
    """No CDN: a machine without internet access gets the whole page."""
    for file in UI_DIR.iterdir():
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", file.read_text(), re.I), file.name


def test_every_ui_file_ships_as_package_data():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["kiln_ray.api"]
    for file in UI_DIR.iterdir():
        assert any(fnmatch.fnmatch(f"ui/{file.name}", p) for p in patterns), file.name


@pytest.fixture(scope="module")
def keyed(tiny_smol_dir):
    app, engine = make_app(tiny_smol_dir, server={"api_key": "user-key-0123456789", "admin_key": "admin-key-9876543210"})
    with TestClient(app) as client:
        yield client
    engine.shutdown()


def test_the_page_is_open_when_the_api_needs_a_key(keyed):
    assert keyed.get("/ui").status_code == 200
    assert keyed.get("/ui/app.js").status_code == 200
    refused = keyed.get("/v1/models")  # what the page then shows its 401 banner for
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "missing_api_key"
    assert keyed.get("/v1/models", headers={"Authorization": "Bearer user-key-0123456789"}).status_code == 200
