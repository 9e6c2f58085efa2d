"""The web UI: GET /ui is one static page (plain HTML, CSS and ES-module JavaScript shipped as
package data in kiln_ray/api/ui/), which then talks to the same public API as any client.

    GET /ui, /ui/        index.html
    GET /ui/{asset}      one of the other files of kiln_ray/api/ui/ (a fixed set, read at install)

The page is served without auth and holds no secrets: the API key a user types is kept in the
browser's localStorage and sent by the page's own fetch calls. Files are read once, when the
app is built, so a request can only ever name one of them (no paths from the URL touch the
disk).
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

from kiln_ray.api.errors import APIError

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The page changes with the package, not per request; a reload after an upgrade must see it.
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def load_assets() -> dict[str, tuple[bytes, str]]:
    """file name -> (content, media type) for every servable file of kiln_ray/api/ui/."""
    folder = resources.files("kiln_ray.api").joinpath("ui")
    assets = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in MEDIA_TYPES:
            assets[entry.name] = (entry.read_bytes(), MEDIA_TYPES[suffix])
    if "index.html" not in assets:
        raise FileNotFoundError("kiln_ray/api/ui/index.html is missing from the package")
    return assets


def install_ui(app: FastAPI) -> None:
    """Add the /ui routes to `app` (kept out of the OpenAPI schema)."""
    assets = load_assets()

    def page() -> Response:
        content, media_type = assets["index.html"]
        return Response(content, media_type=media_type, headers=HEADERS)

    def asset(name: str) -> Response:
        found = assets.get(name)
        if found is None:
            raise APIError(404, f"no UI file {name!r}", code="not_found")
        return Response(found[0], media_type=found[1], headers=HEADERS)

    app.get("/ui", include_in_schema=False)(page)
    app.get("/ui/", include_in_schema=False)(page)
    app.get("/ui/{name}", include_in_schema=False)(asset)
