"""A webhook receiver for the end-to-end tests: what an agent-server (or nestor) posts to
its configured ``webhooks`` lands here.

The agent-server's shape (and nestor's re-emission of it): ``POST {base_url}/conversations``
with one ``ConversationInfo``, ``POST {base_url}/events/{conversation id hex}`` with a JSON
array of events. Every post is recorded with its headers. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass
class Post:
    t: float
    path: str
    headers: dict[str, str]  # lower-case names
    body: Any


class WebhookReceiver:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self._lock = threading.Condition()
        self._posts: list[Post] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # quiet
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    body = json.loads(raw or b"null")
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                with receiver._lock:
                    receiver._posts.append(Post(time.monotonic(), self.path,
                                                {k.lower(): v for k, v in self.headers.items()}, body))
                    receiver._lock.notify_all()
                data = b"{}"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "WebhookReceiver":
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    @property
    def posts(self) -> list[Post]:
        with self._lock:
            return list(self._posts)

    def conversation_posts(self, cid: str | None = None) -> list[Post]:
        return [p for p in self.posts if p.path.rstrip("/").endswith("/conversations")
                and isinstance(p.body, dict) and (cid is None or p.body.get("id") == cid)]

    def event_posts(self, cid: str | None = None) -> list[Post]:
        out = []
        for p in self.posts:
            if "/events/" not in p.path:
                continue
            if cid is None or p.path.rstrip("/").endswith("/events/" + cid.replace("-", "")):
                out.append(p)
        return out

    def events(self, cid: str) -> list[dict[str, Any]]:
        """Every event received for ``cid``, in arrival order."""
        return [e for p in self.event_posts(cid) if isinstance(p.body, list) for e in p.body]

    def wait_until(self, predicate: Callable[["WebhookReceiver"], bool], timeout: float, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                self._lock.release()
                try:
                    ok = predicate(self)
                finally:
                    self._lock.acquire()
                if ok:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"webhook receiver: {what or 'condition'} not met after {timeout}s "
                                       f"({len(self._posts)} posts: {[p.path for p in self._posts][-20:]})")
                self._lock.wait(min(remaining, 0.5))
