"""The history page (docs/history-page.md): `/` and its files under `/static/`, the only HTML served.

Plain files from `static/` (no build step, nothing from another origin, so it works offline), served by Flask's
own static route. Every answer for them carries a strict Content-Security-Policy: no inline script or style,
calls only to this origin, no form submissions and no framing by another page, so neither a session's text nor
another site can run anything in the page's name.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, request

CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "connect-src 'self'",
    "img-src 'self' data:",
    "form-action 'none'",
    "frame-ancestors 'none'",
    "base-uri 'none'",
))
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",  # another origin cannot even load the page's scripts
}
PAGE_ENDPOINTS = ("page.index", "page.shared", "static")

page = Blueprint("page", __name__)


@page.get("/")
def index() -> Response:
    response = current_app.send_static_file("index.html")
    response.headers["Cache-Control"] = "no-cache"  # a new release of the page is seen on the next load
    return response


@page.get("/s/<token>")
def shared(token: str) -> Response:
    """A share link: the page shows the shared session read-only (it reads it from `/api/v1/shared/<token>`).

    The token is in the address: no Referer carries it on, and no search engine keeps the page."""
    response = index()
    response.headers.update({"X-Robots-Tag": "noindex", "Cache-Control": "no-store"})
    return response


@page.after_app_request
def secure_page_files(response: Response) -> Response:
    if request.endpoint in PAGE_ENDPOINTS:
        response.headers.update(PAGE_HEADERS)
    return response
