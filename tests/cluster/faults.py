"""Faults between raygen and a real S3 server: an HTTP proxy in front of the moto server
that fails a chosen share of the uploads (PUTs: whole objects and multipart parts) the way
S3 does under trouble (500 InternalError, 503 SlowDown) or drops the connection."""

from __future__ import annotations

import http.client
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_ERRORS = [
    (500, "InternalError", "We encountered an internal error. Please try again."),
    (503, "SlowDown", "Please reduce your request rate."),
]


class FaultProxy:
    """Forwards every request to `upstream`; fails `put_failure_rate` of the PUTs."""

    def __init__(self, upstream: str, seed: int = 0):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.put_failure_rate = 0.0
        self.injected = 0
        self.forwarded = 0
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes | None:
                if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
                    body = b""
                    while True:  # HTTP chunks: "<hex size>[;ext]\r\n<data>\r\n" ... "0"
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if not size:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return body
                        body += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("content-length") or 0)
                return self.rfile.read(length) if length else None

            def _forward(self) -> None:
                body = self._body()
                if self.command == "PUT" and proxy._should_fail():
                    proxy._fail(self)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                hop = ("connection", "transfer-encoding", "content-length")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
                if body is not None:
                    headers["content-length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                # A HEAD answer has no body but the length of the object's.
                length = response.getheader("content-length") if self.command == "HEAD" else None
                self.send_header("content-length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()
                with proxy._lock:
                    proxy.forwarded += 1

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _should_fail(self) -> bool:
        with self._lock:
            fail = self._random.random() < self.put_failure_rate
            if fail:
                self.injected += 1
            return fail

    def _fail(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            choice = self._random.random()
        if choice < 0.2:  # the connection drops mid-request
            handler.close_connection = True
            handler.connection.close()
            return
        status, code, message = _ERRORS[int(choice * 10) % len(_ERRORS)]
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>{message}</Message></Error>"
        ).encode()
        handler.send_response(status)
        handler.send_header("content-type", "application/xml")
        handler.send_header("content-length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
