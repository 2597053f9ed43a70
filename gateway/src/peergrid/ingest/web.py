"""The gateway's HTTP side: Prometheus text at /metrics, the installer API
under /installer/, the member app under /app/ (peergrid.app), on the
bounded server of peergrid.http.server (connections and time bounded,
bodies read only after authentication, strict JSON, no exception text in
answers)."""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
from typing import Any

log = logging.getLogger("peergrid.gateway")


def serve_http(gw: Any) -> None:
    """Start the gateway's HTTP server in a thread of its own (gw.http, gw.http_port)."""
    from peergrid.app.members import MAX_BODY as APP_BODY
    from peergrid.app.members import AppError, MemberApp
    from peergrid.app.static import asset
    from peergrid.commissioning.installer import MAX_BODY, ApiError, InstallerApi
    from peergrid.http.server import Handler, HttpError, Server, parse_json, server_context

    api = InstallerApi(gw)
    one = gw.presence_lock

    app = MemberApp(gw, gw.cfg.extra.get("app") or {})
    gw.app = app

    class H(Handler):
        def _send(self, status: int, body: bytes, ctype: str, cache: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "max-age=60" if cache else "no-store")
            # the page's own files only: no inline script, no other origin, not framed
            self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                             "style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def _app(self, method: str) -> None:
            path = self.path.split("?", 1)[0]
            if not path.startswith("/app/api/"):
                if method != "GET":
                    self.send_json(405, {"error": "method not allowed"})
                    return
                self.body_length(0)
                a = asset(path)
                if a is None:
                    self._send(404, b"not found", "text/plain")
                else:
                    self._send(200, a[0], a[1], cache=True)
                return
            try:
                addr = self.client_address[0]
                if path in ("/app/api/challenge", "/app/api/signin", "/app/api/signout") and method == "POST":
                    if path == "/app/api/signout":
                        self.body_length(APP_BODY)
                        obj: Any = app.signout(self.headers.get("Authorization"))
                    else:
                        body = parse_json(self.read_body(APP_BODY))
                        if not isinstance(body, dict):
                            raise AppError(400, "a JSON object is expected")
                        obj = (app.challenge if path.endswith("challenge") else app.signin)(body, addr)
                    status, ctype = 200, "json"
                else:
                    who = app.authenticate(self.headers.get("Authorization"))   # before any byte of a body
                    body = parse_json(self.read_body(APP_BODY)) if method == "POST" else None
                    if method == "GET":
                        self.body_length(0)
                    status, obj, ctype = app.handle(method, self.path, who, body)
            except (AppError, HttpError) as e:
                status, obj, ctype = e.status, {"error": e.msg}, "json"
            except sqlite3.OperationalError:
                log.exception("member app: database unavailable")
                status, obj, ctype = 503, {"error": "the gateway's database is busy; try again"}, "json"
            except Exception:  # noqa: BLE001 - answered, logged, the gateway goes on
                log.exception("member app failed")
                status, obj, ctype = 500, {"error": "internal error (logged by the gateway)"}, "json"
            gw.metrics.inc(f"http_app_{status // 100}xx")
            if ctype == "json":
                self._send(status, json.dumps(obj).encode(), "application/json")
            else:
                self._send(status, obj if isinstance(obj, bytes) else obj.encode(), ctype)

        def _installer(self, method: str) -> None:
            try:
                who = api.authenticate(self.headers.get("Authorization"))   # before any byte of a body
                status, obj = api.handle(method, self.path, who, self.read_body(MAX_BODY))
            except (ApiError, HttpError) as e:
                status, obj = e.status, {"error": e.msg}
            except sqlite3.OperationalError:
                log.exception("installer API: database unavailable")
                status, obj = 503, {"error": "the gateway's database is unavailable (busy or full); try again"}
            except Exception:  # noqa: BLE001 - answered, logged, the gateway goes on
                log.exception("installer API failed")
                status, obj = 500, {"error": "internal error (logged by the gateway)"}
            gw.metrics.inc(f"http_{status // 100}xx")
            self.send_json(status, obj)

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            if self.path.startswith("/app/"):
                self._app("POST")
            elif self.path.startswith("/installer/"):
                self._installer("POST")
            else:
                self.send_json(404, {"error": "not found"})

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path.startswith("/installer/"):
                self._installer("GET")
                return
            if self.path == "/" or self.path == "/app" or self.path.startswith("/app/"):
                if self.path in ("/", "/app"):
                    self.send_response(302)
                    self.send_header("Location", "/app/")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._app("GET")
                return
            if self.path != "/metrics":
                self.send_json(404, {"error": "not found"})
                return
            self.body_length(0)            # a GET with a body is refused (413)
            try:
                with one:                  # one shared read connection
                    text = gw.metrics.prometheus(gw.presence()) + gw.link.prometheus()
            except sqlite3.Error:
                log.exception("metrics: presence unavailable")
                self.send_json(503, {"error": "the gateway's database is unavailable; try again"})
                return
            self.send_text(200, text, "text/plain; version=0.0.4")

    tls = server_context(gw.cfg.cert_file, gw.cfg.key_file) if gw.cfg.http_tls else None
    gw.http = Server((gw.cfg.http_host, gw.cfg.http_port), H, gw.cfg.http_max_connections,
                       gw.cfg.http_timeout_s, gw.metrics, tls)
    gw.http_port = gw.http.server_address[1]
    threading.Thread(target=gw.http.serve_forever, name="http", daemon=True).start()

