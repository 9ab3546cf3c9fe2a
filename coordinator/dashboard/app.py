"""The read-only fleet dashboard: a Starlette app with Jinja2 pages, served by uvicorn.

Pages are rendered on the server; the browser re-fetches the page's content fragment every few
seconds (plain polling: it survives proxies and sleeping phones, and a refresh is one small
render) and feeds the charts' numbers to uPlot, which ships inside the package (static/, MIT), so
nothing is downloaded at run time. Nothing here writes to the fleet state.

Access: bound to loopback, anyone on the machine may look (like ``fedge status``); bound to any
other address it needs a token, sent as ``Authorization: Bearer …``, or once as ``?token=…`` (which
sets a cookie and redirects to the address without it).
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from coordinator.dashboard.views import FleetView
from coordinator.fleet.state import FleetState

if TYPE_CHECKING:
    from coordinator.fleet.server import FleetCoordinator

HERE = Path(__file__).parent
COOKIE = "fedge_dashboard"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",  # a ?token= URL never leaks through a Referer
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def access_token(host: str, token: str | None) -> str | None:
    """The token the dashboard will require: the one given, else a fresh random one unless bound to
    loopback (None: no token needed)."""
    if token:
        return token
    return None if is_loopback(host) else secrets.token_urlsafe(18)


class TokenGate(BaseHTTPMiddleware):
    def __init__(self, app: Any, token: str) -> None:
        super().__init__(app)
        self.token = token

    def _ok(self, supplied: str | None) -> bool:
        return bool(supplied) and hmac.compare_digest(supplied.encode(), self.token.encode())

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        query = request.query_params.get("token")
        if query is not None and self._ok(query):  # once: remember it, then drop it from the address bar
            url = request.url.remove_query_params("token")
            response = RedirectResponse(str(url), status_code=303)
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict",
                                secure=request.url.scheme == "https")
            return response
        auth = request.headers.get("authorization", "")
        bearer = auth[7:] if auth.lower().startswith("bearer ") else None
        if not (self._ok(bearer) or self._ok(request.cookies.get(COOKIE))):
            return PlainTextResponse("this dashboard needs its token: open the address `fedge serve --ui` printed "
                                     "(…/?token=…) or send 'Authorization: Bearer <token>'\n", status_code=401)
        return await call_next(request)


class SecurityHeaders(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} d ago"


def _clock(ts: float | None) -> str:
    return "—" if ts is None else time.strftime("%H:%M:%S", time.localtime(ts))


def create_app(view: FleetView, *, token: str | None = None, refresh_s: float = 2.0) -> Starlette:
    """The dashboard for one fleet view; `token` None: open to whoever reaches the address."""
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters.update(fmt=_fmt, ago=_ago, clock=_clock)
    templates.env.globals.update(refresh_ms=int(refresh_s * 1000))

    def query(request: Request) -> str:
        return request.query_params.get("q", "")[:64]

    def index(request: Request) -> Response:
        return templates.TemplateResponse(request, "index.html", {"d": view.overview(query(request))})

    def overview_fragment(request: Request) -> Response:
        return templates.TemplateResponse(request, "_overview.html", {"d": view.overview(query(request))})

    def device_page(request: Request) -> Response:
        d = view.device(request.path_params["device_id"])
        if d is None:
            return templates.TemplateResponse(request, "missing.html", {"device_id": request.path_params["device_id"]},
                                              status_code=404)
        name = "_device.html" if request.query_params.get("fragment") else "device.html"
        return templates.TemplateResponse(request, name, {"d": d})

    def api_overview(request: Request) -> Response:
        return JSONResponse(view.overview(query(request)))

    def api_device(request: Request) -> Response:
        d = view.device(request.path_params["device_id"])
        return JSONResponse(d) if d is not None else JSONResponse({"error": "unknown device"}, status_code=404)

    middleware = [Middleware(SecurityHeaders)]
    if token:
        middleware.append(Middleware(TokenGate, token=token))
    routes = [
        Route("/", index),
        Route("/fragment/overview", overview_fragment),
        Route("/devices/{device_id}", device_page),
        Route("/api/overview", api_overview),
        Route("/api/devices/{device_id}", api_device),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    return Starlette(routes=routes, middleware=middleware)


class DashboardServer:
    """uvicorn on a daemon thread (inside ``fedge serve`` and ``fedge demo``), or in the foreground."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 8750, token: str | None = None) -> None:
        self.host, self.token = host, token
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    access_log=False, lifespan="off"))
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        for server in getattr(self.server, "servers", ()):  # set once listening (port 0: the one chosen)
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return self.server.config.port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '[::]') else host}:{self.port}/"
        return base + (f"?token={self.token}" if self.token else "")

    def start(self, timeout_s: float = 10.0) -> DashboardServer:
        self._thread = threading.Thread(target=self.server.run, name="fedge-dashboard", daemon=True)
        self._thread.start()
        deadline = time.time() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.time() > deadline:
                raise RuntimeError(f"dashboard could not listen on {self.host}:{self.server.config.port} "
                                   "(address in use?)")
            time.sleep(0.05)
        return self

    def run(self) -> None:
        self.server.run()

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)


def start_dashboard(db: str | Path, host: str, port: int, token: str | None = None, *,
                    live: FleetCoordinator | None = None, task: str | None = None, fleet: str | None = None,
                    background: bool = True, refresh_s: float = 2.0) -> DashboardServer:
    """The dashboard of one fleet database on its own read-only connection (WAL: it never waits for the
    coordinator's writes), with the live coordinator's counters when it runs inside it. `background`: on
    a daemon thread, already listening when this returns; else call ``run()``."""
    token = access_token(host, token)
    view = FleetView(FleetState(db, readonly=True), task=task or (live.cfg.task if live else "tsfm"),
                     fleet=fleet or (live.cfg.fleet if live else Path(db).name), live=live)
    server = DashboardServer(create_app(view, token=token, refresh_s=refresh_s), host, port, token)
    return server.start() if background else server
