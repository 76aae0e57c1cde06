"""The live dashboard: one page the control API serves at ``/dashboard``, drawn from its JSON endpoints.

The page is static (HTML, one script, one stylesheet and uPlot, vendored in ``static/vendor`` so it works
offline); everything it shows it reads from ``/v1/metrics``, ``/v1/policy`` and ``/v1/history`` in the
browser, so there is no second source of numbers to drift from the API. Reading needs no token, as the
endpoints it reads; changing the policy from the page sends the ``X-Inferos-Token`` the user types in.

uPlot is used because it is small (50 kB), maintained, has no dependencies and draws time series on a
canvas fast enough to redraw every poll.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).with_name("static")
# the page runs only its own files: no inline script, no other origin (a page opened offline needs nothing else)
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def mount_dashboard(app: FastAPI) -> None:
    """``GET /dashboard`` (the page) and ``/dashboard/static/*`` (its files) on ``app``."""
    headers = {"Content-Security-Policy": CONTENT_SECURITY_POLICY}

    @app.api_route("/dashboard", methods=["GET", "HEAD"], include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=headers)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/dashboard")

    app.mount("/dashboard/static", StaticFiles(directory=STATIC_DIR), name="dashboard-static")
