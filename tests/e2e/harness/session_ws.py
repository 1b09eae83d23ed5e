"""Raw client for ``/sockets/session/{id}?after_seq=N`` (agent-server 1.58 session socket).

Frames are JSON envelopes: ``sync{from_seq, through_seq}`` first, then ``durable{seq, event}``
(persisted, resumable), ``transient{event}``, streaming ``item_started``/``delta``/
``item_aborted``, and ``error{code, detail}``. ``check_continuity`` verifies the contract a
proxy must keep: sync first, durable seqs strictly consecutive (no gap, no repeat) starting
right after ``after_seq``, and no event id twice.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlencode, urlparse

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect


def session_socket_url(base_url: str, conversation_id: str, after_seq: int | None = None, query_key: str | None = None) -> str:
    p = urlparse(base_url)
    scheme = "wss" if p.scheme == "https" else "ws"
    q: dict[str, Any] = {}
    if after_seq is not None:
        q["after_seq"] = after_seq
    if query_key:
        q["session_api_key"] = query_key
    return f"{scheme}://{p.netloc}{p.path.rstrip('/')}/sockets/session/{conversation_id}" + (f"?{urlencode(q)}" if q else "")


@dataclass
class SessionSocket:
    """Collects envelopes from one session-socket connection.

    ``auth``: ``"header"`` (X-Session-API-Key), ``"query"`` (?session_api_key=) or
    ``"frame"`` (first-message ``{"type":"auth",...}``) - the three ways clients authenticate.
    """

    base_url: str
    api_key: str | None
    conversation_id: str
    after_seq: int | None = None
    auth: str = "header"
    open_timeout: float = 15.0
    envelopes: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str | None = None
    _ws: ClientConnection | None = None

    def connect(self) -> "SessionSocket":
        headers = {}
        query_key = None
        if self.api_key and self.auth == "header":
            headers["X-Session-API-Key"] = self.api_key
        elif self.api_key and self.auth == "query":
            query_key = self.api_key
        url = session_socket_url(self.base_url, self.conversation_id, self.after_seq, query_key)
        self._ws = connect(url, additional_headers=headers, open_timeout=self.open_timeout, close_timeout=5, max_size=None)
        if self.api_key and self.auth == "frame":
            self._ws.send(json.dumps({"type": "auth", "session_api_key": self.api_key}))
        return self

    def __enter__(self) -> "SessionSocket":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._ws is not None:
            try:
                self._ws.close()
            except Exception:
                pass

    def send_message(self, text: str) -> None:
        """Send a user message (starts a run), as a frontend would."""
        assert self._ws is not None
        self._ws.send(json.dumps({"role": "user", "content": [{"type": "text", "text": text}]}))

    def recv(self, timeout: float) -> dict[str, Any] | None:
        """One envelope, or None on timeout. Raises ConnectionClosed when the socket closes."""
        assert self._ws is not None
        try:
            raw = self._ws.recv(timeout=timeout)
        except TimeoutError:
            return None
        except ConnectionClosed as e:
            frame = e.rcvd or e.sent
            self.close_code = frame.code if frame else None
            self.close_reason = frame.reason if frame else None
            raise
        env = json.loads(raw)
        self.envelopes.append(env)
        return env

    def collect_until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """Read envelopes until one satisfies ``predicate`` (returned); TimeoutError if none."""
        deadline = time.monotonic() + timeout
        for env in self.envelopes:
            if predicate(env):
                return env
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching envelope after {timeout}s; got {summarize(self.envelopes)}")
            env = self.recv(timeout=min(remaining, 1.0))
            if env is not None and predicate(env):
                return env

    def drain(self, quiet: float = 0.5, max_time: float = 10.0) -> None:
        """Read until no frame arrives for ``quiet`` seconds (bounded by ``max_time``)."""
        deadline = time.monotonic() + max_time
        while time.monotonic() < deadline:
            if self.recv(timeout=quiet) is None:
                return

    def wait_until_closed(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.recv(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
        except ConnectionClosed:
            return self.close_code
        raise TimeoutError(f"socket still open after {timeout}s")

    # -- views ---------------------------------------------------------------------
    def durable(self) -> list[dict[str, Any]]:
        return [e for e in self.envelopes if e.get("type") == "durable"]

    def durable_events(self) -> list[dict[str, Any]]:
        return [e["event"] for e in self.durable()]

    def last_seq(self) -> int | None:
        d = self.durable()
        return d[-1]["seq"] if d else None


def summarize(envs: list[dict[str, Any]], limit: int = 60) -> list[str]:
    out = []
    for e in envs[-limit:]:
        t = e.get("type")
        if t in ("durable", "transient"):
            ev = e["event"]
            key = ev.get("key")
            out.append(f"{t}{'#' + str(e['seq']) if t == 'durable' else ''}:{ev.get('kind')}{'[' + key + ']' if key else ''}")
        else:
            out.append(str(t))
    return out


def is_run_finished_durable(env: dict[str, Any], statuses: tuple[str, ...] = ("finished", "error", "stuck")) -> bool:
    ev = env.get("event") or {}
    return (
        env.get("type") == "durable"
        and ev.get("kind") == "ConversationStateUpdateEvent"
        and ev.get("key") == "execution_status"
        and ev.get("value") in statuses
    )


def check_continuity(envelopes: list[dict[str, Any]], after_seq: int | None) -> list[int]:
    """Assert the session-socket contract on one connection's envelopes; return durable seqs.

    * the first envelope is ``sync`` and echoes ``after_seq`` as ``from_seq``;
    * durable seqs are strictly consecutive (no gap, no repeat);
    * with ``after_seq`` set and history present, the first durable seq is ``after_seq + 1``
      (``0`` for ``after_seq=-1``) and replay covers everything up to ``through_seq``;
    * no event id appears twice among durable frames, and no durable event also arrives as
      a transient one.
    """
    assert envelopes, "no envelopes received"
    sync = envelopes[0]
    assert sync.get("type") == "sync", f"first envelope is not sync: {sync}"
    assert [e for e in envelopes if e.get("type") == "sync"] == [sync], "more than one sync envelope"
    assert sync.get("from_seq") == after_seq, f"sync.from_seq {sync.get('from_seq')} != after_seq {after_seq}"
    through = sync.get("through_seq")
    durable = [e for e in envelopes if e.get("type") == "durable"]
    seqs = [e["seq"] for e in durable]
    for a, b in zip(seqs, seqs[1:]):
        assert b == a + 1, f"durable seq not consecutive: ...{a}, {b}... in {seqs}"
    if after_seq is not None and through is not None and through > after_seq:
        assert seqs, f"expected replay of seq {after_seq + 1}..{through}, got no durable frames"
        assert seqs[0] == max(after_seq + 1, 0), f"replay starts at {seqs[0]}, expected {max(after_seq + 1, 0)}"
        assert seqs[-1] >= through, f"replay stopped at {seqs[-1]} < through_seq {through}"
    ids = [e["event"]["id"] for e in durable]
    assert len(ids) == len(set(ids)), "a durable event id was delivered twice"
    transient_ids = {e["event"]["id"] for e in envelopes if e.get("type") == "transient"}
    assert not (transient_ids & set(ids)), "an event arrived both as durable and as transient"
    return seqs


def check_against_log(envelopes: list[dict[str, Any]], rest_events: list[dict[str, Any]]) -> None:
    """Every durable frame's ``seq`` is the event's index in the REST log (same id/kind)."""
    for e in envelopes:
        if e.get("type") != "durable":
            continue
        seq, ev = e["seq"], e["event"]
        assert seq < len(rest_events), f"durable seq {seq} beyond REST log length {len(rest_events)}"
        logged = rest_events[seq]
        assert logged["id"] == ev["id"], f"seq {seq}: socket has {ev.get('kind')}#{ev['id']}, log has {logged.get('kind')}#{logged['id']}"
