"""The operators' console: `GET /admin/ui`, one static page and its script and style.

The files ship in the package (`api/ui/`) and are served as they are: no build step, no
external URL, so the console works on an air-gapped network. The page holds no data and
loads without the admin key; it asks for the key, keeps it in `sessionStorage` and sends
it as `X-Admin-Key` on every call it makes to the admin and service API. Like the rest
of `/admin/*` it is `404` while the admin API is off.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from api.dependencies import require_admin
from shared.errors import Forbidden, NotFound


async def console_on(request: Request) -> None:
    """404 while the admin API is off, like the rest of /admin/*; but no key needed: the
    console holds no data, and every call it makes carries the key."""
    try:
        await require_admin(request)
    except Forbidden:
        pass


router = APIRouter(
    prefix="/admin/ui", tags=["admin"], include_in_schema=False, dependencies=[Depends(console_on)]
)

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""No inline script or style, no other origin: the page talks to this gateway only."""

HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

FILES = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
"""What the console is made of; nothing else under /admin/ui is served."""


@cache
def _read(name: str) -> bytes:
    return files("api").joinpath("ui", name).read_bytes()


def _console_file(name: str) -> Response:
    if name not in FILES:
        raise NotFound("Not Found")
    return Response(_read(name), media_type=FILES[name], headers=HEADERS)


@router.get("")
async def page() -> Response:
    return _console_file("index.html")


@router.get("/{name}")
async def asset(name: str) -> Response:
    return _console_file(name)
