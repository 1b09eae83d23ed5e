"""Differential fidelity harness: the same requests to a real agent-server and through nestor.

Two fresh agent-servers with identical configuration are started; one ("direct") is used
directly, the other sits behind nestor (``existing`` provisioner, one server). Every
``Step`` is sent to both, in the same order (direct first, then nestor), and the answers are
compared after normalisation:

* **status**;
* **headers that matter** (``RELEVANT_HEADERS``: content type, location, set-cookie shape,
  CORS and cache headers, ``allow``, ``content-disposition``, ...);
* **bodies**: JSON compared structurally; text and binary (zip, tar) by their normalised
  content or member names.

Normalisation removes what differs by construction, never by behaviour: each side's origin
and port, its state root directory, timestamps, and random ids (UUIDs and 32-hex ids are
replaced by placeholders numbered in order of first appearance on each side, so the same
entity gets the same placeholder on both sides). Conversation ids the harness chooses are
the same on both sides and kept readable (``<cid>``).

A difference nestor makes on purpose is declared on the step as a ``Design``: the reason
(which goes into docs/compatibility.md) and a check that the observed difference is exactly
the declared one (e.g. "nestor's answer minus ``nestor_version`` equals the agent-server's").
Any other difference is *unexplained* and fails the test.

Every response nestor sends (REST, WebSocket frames, close reasons, refused upgrades) is
kept for the leak scan: no downstream key, downstream port or downstream address may appear.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlencode, urlparse

import httpx

# Headers compared between the two sides (lower case).
RELEVANT_HEADERS = (
    "content-type",
    "location",
    "set-cookie",
    "cache-control",
    "vary",
    "allow",
    "content-disposition",
    "www-authenticate",
    "retry-after",
    "access-control-allow-origin",
    "access-control-allow-credentials",
    "access-control-allow-methods",
    "access-control-allow-headers",
    "access-control-max-age",
    "access-control-expose-headers",
    "x-openhands-serverconversation-id",
)

UUID_RE = re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}(?![0-9a-fA-F])")
HEX32_RE = re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{32}(?![0-9a-fA-F])")
CALL_ID_RE = re.compile(r"call_[0-9a-f]{24}")
TS_RE = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?")
VAR_RE = re.compile(r"\$\{([a-z_0-9]+)\}")

UNSET: Any = object()


# ---------------------------------------------------------------- sides and records


@dataclass
class Rec:
    """One answer as received (REST or a WebSocket exchange)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    seconds: float = 0.0
    # WebSocket exchanges: frames received (text) and how the socket ended.
    frames: list[str] | None = None
    close: tuple[int | None, str | None] | None = None
    error: str | None = None

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Side:
    """One way of reaching an agent-server: directly, or through nestor."""

    name: str  # "direct" | "nestor"
    base_url: str
    api_key: str
    root: str  # this side's state root (workspaces, server state)
    vars: dict[str, Any] = field(default_factory=dict)
    transcript: list[tuple[str, Rec]] = field(default_factory=list)
    ids: dict[str, str] = field(default_factory=dict)  # canonical uuid -> placeholder
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _client: httpx.Client | None = None

    @property
    def port(self) -> int:
        return urlparse(self.base_url).port or 80

    @property
    def ws_base(self) -> str:
        return "ws://" + urlparse(self.base_url).netloc

    def client(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(base_url=self.base_url, timeout=60.0, follow_redirects=False, trust_env=False)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def record(self, label: str, rec: Rec) -> None:
        with self._lock:
            self.transcript.append((label, rec))

    def fmt(self, v: Any) -> Any:
        """Fill ``${var}`` placeholders (recursively in lists and dicts)."""
        if isinstance(v, str):
            m = VAR_RE.fullmatch(v)
            if m:  # a whole-value variable keeps its type
                return self.vars[m.group(1)]
            return VAR_RE.sub(lambda m: str(self.vars[m.group(1)]), v)
        if isinstance(v, list):
            return [self.fmt(x) for x in v]
        if isinstance(v, tuple):
            return tuple(self.fmt(x) for x in v)
        if isinstance(v, dict):
            return {self.fmt(k): self.fmt(x) for k, x in v.items()}
        return v


# ---------------------------------------------------------------- declared differences


@dataclass
class View:
    """A normalised answer: what is compared."""

    status: int
    headers: dict[str, str]
    body: Any

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "headers": self.headers, "body": self.body}


# check(direct_view, nestor_view) -> problems (empty: the observed difference is the declared one)
Check = Callable[[View, View], list[str]]


@dataclass
class Design:
    """A difference nestor makes on purpose."""

    reason: str
    check: Check
    # "design": nestor answers differently on purpose; "unsupported": nestor does not serve
    # the route (its answer is in ``reason``).
    kind: str = "design"
    # A few words for the route table (the reason is in the list of differences).
    short: str = ""


def same_except(*, drop_keys: tuple[str, ...] = (), status: int | None = None, headers: tuple[str, ...] = (),
                body: Callable[[Any, Any], list[str]] | None = None) -> Check:
    """The answers match once nestor's ``drop_keys`` (top level) are removed, the listed
    headers are ignored, and (if given) nestor's status is ``status``; ``body`` compares the
    bodies itself."""

    def check(d: View, n: View) -> list[str]:
        problems: list[str] = []
        if status is not None:
            if n.status != status:
                problems.append(f"nestor status {n.status}, declared {status}")
        elif d.status != n.status:
            problems.append(f"status {d.status} vs {n.status}")
        dh = {k: v for k, v in d.headers.items() if k not in headers}
        nh = {k: v for k, v in n.headers.items() if k not in headers}
        if status is None and dh != nh:
            problems.append(f"headers {diff_values(dh, nh)}")
        nb = n.body
        if drop_keys:
            if not isinstance(nb, dict) or not all(k in nb for k in drop_keys):
                problems.append(f"nestor body lacks {drop_keys}")
            else:
                nb = {k: v for k, v in nb.items() if k not in drop_keys}
        if body is not None:
            problems += body(d.body, nb)
        elif status is None and d.body != nb:
            problems.append("body " + "; ".join(diff_values(d.body, nb)))
        return problems

    return check


def nestor_answers(status: int, detail: str | Callable[[Any], bool] | None = None, *, direct_status: int | None = None) -> Check:
    """nestor answers ``status`` (with ``detail``, exact or a predicate on the body); the
    agent-server's answer, if ``direct_status`` is given, must be that."""

    def check(d: View, n: View) -> list[str]:
        problems = []
        if n.status != status:
            problems.append(f"nestor status {n.status}, declared {status}")
        if direct_status is not None and d.status != direct_status:
            problems.append(f"agent-server status {d.status}, declared {direct_status}")
        if isinstance(detail, str):
            got = n.body.get("detail") if isinstance(n.body, dict) else n.body
            if got != detail:
                problems.append(f"nestor detail {str(got)[:200]!r}, declared {detail[:200]!r}")
        elif callable(detail) and not detail(n.body):
            problems.append(f"nestor body {str(n.body)[:200]!r} does not match the declaration")
        return problems

    return check


# ---------------------------------------------------------------- steps


@dataclass
class Step:
    """One request, sent to both sides. Strings may hold ``${var}`` (per-side values)."""

    route: str | None  # "METHOD /path" as in routes-1.58.2.tsv (None: an extra check)
    label: str
    method: str = "GET"
    path: str = "/"
    params: Any = None
    json: Any = UNSET
    content: bytes | str | None = None
    files: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    auth: str = "ok"  # ok | none | wrong
    origin: bool = True  # send Origin: http://localhost:3000 (CORS headers are compared too)
    body: str = "auto"  # auto | json | text | zip | tar | none
    unordered: bool = False  # event lists compared as multisets (see ``unordered``)
    ignore: tuple[str, ...] = ()  # JSON keys whose values are volatile (anywhere in the body)
    capture: Callable[[Rec, Side], None] | None = None
    poll: tuple[Callable[[Rec], bool], float] | None = None  # repeat until predicate (bounded)
    before: Callable[[Side], None] | None = None  # side effect before the request
    design: Design | None = None
    cross: str | None = None  # a cross-cutting difference (not charged to the route)
    expect: int | tuple[int, ...] | None = None  # the agent-server's status this step relies on
    timeout: float = 60.0


@dataclass
class Outcome:
    step: Step
    direct: View | None
    nestor: View | None
    verdict: str  # identical | design | unsupported | unexplained | error
    problems: list[str] = field(default_factory=list)
    note: str = ""
    seconds: tuple[float, float] = (0.0, 0.0)

    @property
    def route(self) -> str | None:
        return self.step.route


def send(side: Side, step: Step) -> Rec:
    try:
        headers = {k: side.fmt(v) for k, v in step.headers.items()}
    except KeyError as e:
        rec = Rec(0, [], b"", 0.0, error=f"variable {e} was not captured by an earlier step")
        side.record(f"{step.method} {step.path}", rec)
        return rec
    if step.auth == "ok":
        headers.setdefault("X-Session-API-Key", side.api_key)
    elif step.auth == "wrong":
        headers.setdefault("X-Session-API-Key", "wrong-" + side.api_key[::-1])
    if step.origin:
        headers.setdefault("Origin", "http://localhost:3000")
    kwargs: dict[str, Any] = {"headers": headers, "timeout": step.timeout}
    if step.params is not None:
        kwargs["params"] = step.params
    if step.json is not UNSET:
        kwargs["json"] = step.json
    if step.content is not None:
        kwargs["content"] = step.content
    if step.files is not None:
        kwargs["files"] = step.files
    try:
        path = side.fmt(step.path)
        for k in ("params", "json", "content"):
            if k in kwargs and isinstance(kwargs[k], (str, dict, list, tuple)):
                kwargs[k] = side.fmt(kwargs[k])
    except KeyError as e:  # a variable an earlier step failed to capture
        rec = Rec(0, [], b"", 0.0, error=f"variable {e} was not captured by an earlier step")
        side.record(f"{step.method} {step.path}", rec)
        return rec
    deadline = time.monotonic() + (step.poll[1] if step.poll else 0)
    while True:
        t0 = time.monotonic()
        try:
            r = side.client().request(step.method, path, **kwargs)
            rec = Rec(r.status_code, list(r.headers.multi_items()), r.content, time.monotonic() - t0)
        except httpx.HTTPError as e:
            rec = Rec(0, [], b"", time.monotonic() - t0, error=f"{type(e).__name__}: {e}")
        if step.poll is None or step.poll[0](rec) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    side.record(f"{step.method} {path}", rec)
    return rec


# ---------------------------------------------------------------- normalisation


class Normaliser:
    """Per-side normalisation (see the module docs)."""

    def __init__(self, side: Side, fixed_ids: dict[str, str], other_values: dict[str, str] | None = None) -> None:
        self.side = side
        self.fixed = {canon(k): v for k, v in fixed_ids.items()}
        self._tls = threading.local()
        p = urlparse(side.base_url)
        self.replacements = [
            (side.base_url, "<origin>"),
            (f"ws://{p.netloc}", "<ws-origin>"),
            (p.netloc, "<host>"),
            (f"localhost:{p.port}", "<host>"),
            (side.root, "<root>"),
            (side.api_key, "<client-key>"),
        ]
        for k, v in (other_values or {}).items():
            self.replacements.append((k, v))

    def begin(self) -> None:
        """Start one answer: other ids are numbered in order of appearance within it."""
        self._tls.local = {}

    def placeholder(self, raw: str) -> str:
        c = canon(raw)
        if c in self.fixed:
            return self.fixed[c]
        named = self.side.ids.get(c)  # an id an earlier answer gave and a step captured
        if named is not None:
            return named
        if getattr(self._tls, "blank", False):
            return "<id>"
        local = getattr(self._tls, "local", None)
        if local is None:
            local = self._tls.local = {}
        ph = local.get(c)
        if ph is None:
            ph = local[c] = f"<id{len(local) + 1}>"
        return ph

    def text(self, s: str) -> str:
        for a, b in self.replacements:
            if a:
                s = s.replace(a, b)
        s = UUID_RE.sub(lambda m: self.placeholder(m.group(0)), s)
        s = HEX32_RE.sub(lambda m: self.placeholder(m.group(0)), s)
        s = CALL_ID_RE.sub(lambda m: self.placeholder(m.group(0)), s)
        return TS_RE.sub("<ts>", s)

    def value(self, v: Any, ignore: tuple[str, ...] = ()) -> Any:
        if isinstance(v, str):
            return self.text(v)
        if isinstance(v, list):
            return [self.value(x, ignore) for x in v]
        if isinstance(v, dict):
            out = {}
            for k in sorted(v, key=str):  # sorted: placeholders numbered the same on both sides
                nk = self.text(k) if isinstance(k, str) else k
                out[nk] = "<volatile>" if k in ignore else self.value(v[k], ignore)
            return out
        return v

    def blanked(self, v: Any, ignore: tuple[str, ...] = ()) -> Any:
        """Normalised with every unnamed id as ``<id>`` (for multisets: numbering ids in
        order of appearance would depend on the order being ignored)."""
        self._tls.blank = True
        try:
            return self.value(v, ignore)
        finally:
            self._tls.blank = False

    def multiset(self, v: Any, ignore: tuple[str, ...] = ()) -> Any:
        """Event lists as multisets: two agent runs may persist simultaneous events (an
        action and a stats update) in either order.

        ``execution_status`` and ``stats`` updates are left out: the agent-server publishes
        status transitions from its run loop and from its callbacks, and how many of them it
        persists depends on timing (on a loaded machine one server persists an extra
        ``finished``/``idle``/``running`` sequence the other does not, with or without
        nestor); a ``stats`` update carries the usage accumulated when it was taken, which
        may or may not include a side question (``ask_agent``) answered meanwhile. The
        status and the stats are compared by the steps that read the conversation."""
        v = self.blanked(v, ignore)

        def status_update(x: Any) -> bool:
            e = x.get("event", x) if isinstance(x, dict) else None
            return isinstance(e, dict) and e.get("kind") == "ConversationStateUpdateEvent" and e.get("key") in ("execution_status", "stats")

        def order(items: list[Any]) -> list[Any]:
            key = lambda x: json.dumps(x, sort_keys=True)  # noqa: E731
            return sorted((x for x in items if not status_update(x)), key=key)

        if isinstance(v, list):
            return order(v)
        if isinstance(v, dict) and isinstance(v.get("items"), list):
            return {**v, "items": order(v["items"])}
        return v

    def headers(self, rec: Rec) -> dict[str, str]:
        out: dict[str, list[str]] = {}
        for k, v in rec.headers:
            k = k.lower()
            if k in RELEVANT_HEADERS:
                if k == "set-cookie":
                    v = cookie_shape(v)
                elif k == "vary":
                    v = ", ".join(sorted(x.strip() for x in v.split(",")))
                elif k == "content-type":
                    v = v.replace(" ", "").lower()
                out.setdefault(k, []).append(self.text(v))
        return {k: " | ".join(sorted(v) if k != "set-cookie" else v) for k, v in out.items()}

    def body(self, rec: Rec, kind: str, ignore: tuple[str, ...], unordered: bool = False) -> Any:
        data = rec.body
        if kind == "none":
            return None
        ctype = (rec.header("content-type") or "").lower()
        if kind == "tar" or (kind == "auto" and data[:2] == b"\x1f\x8b"):
            try:
                with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as t:
                    return {"tar": sorted(self.text(n) for n in t.getnames())}
            except tarfile.TarError:
                return {"not-a-tar": len(data)}
        if kind == "zip" or (kind == "auto" and (ctype.endswith("/zip") or data[:2] == b"PK")):
            try:
                with zipfile.ZipFile(io.BytesIO(data)) as z:
                    return {"zip": sorted(self.text(n) for n in z.namelist())}
            except zipfile.BadZipFile:
                return {"not-a-zip": self.text(data.decode("utf-8", "replace"))}
        if kind in ("auto", "json"):
            try:
                if not data:
                    return ""
                v = json.loads(data)
                return self.multiset(v, ignore) if unordered else self.value(v, ignore)
            except ValueError:
                if kind == "json":
                    return {"not-json": self.text(data.decode("utf-8", "replace"))}
        return self.text(data.decode("utf-8", "replace"))

    def view(self, rec: Rec, step: Step) -> View:
        self.begin()
        if rec.error:
            return View(0, {}, {"transport-error": rec.error})
        return View(rec.status, self.headers(rec), self.body(rec, step.body, step.ignore, step.unordered))


def canon(raw: str) -> str:
    s = raw.lower().replace("-", "")
    return str(uuid.UUID(s)) if len(s) == 32 else raw


def cookie_shape(v: str) -> str:
    """A Set-Cookie value's shape: name, attribute names (and their values except dates)."""
    parts = [p.strip() for p in v.split(";") if p.strip()]
    name, _, value = parts[0].partition("=")
    attrs = []
    for a in parts[1:]:
        k, eq, val = a.partition("=")
        k = k.strip().lower()
        if k == "expires":
            val = "<date>"
        attrs.append(f"{k}={val.strip()}" if eq else k)
    return f"{name}={value}; " + "; ".join(sorted(attrs))


def diff_values(a: Any, b: Any, path: str = "", out: list[str] | None = None, limit: int = 12) -> list[str]:
    """Where two JSON values differ (paths, truncated values)."""
    out = [] if out is None else out
    if len(out) >= limit:
        return out
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a:
                out.append(f"{path}/{k}: only nestor ({short(b[k])})")
            elif k not in b:
                out.append(f"{path}/{k}: only direct ({short(a[k])})")
            else:
                diff_values(a[k], b[k], f"{path}/{k}", out, limit)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            diff_values(x, y, f"{path}[{i}]", out, limit)
    elif a != b:
        out.append(f"{path or '/'}: direct {short(a)} != nestor {short(b)}")
    return out


def short(v: Any, n: int = 160) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def compare(d: View, n: View) -> list[str]:
    problems = []
    if d.status != n.status:
        problems.append(f"status {d.status} vs {n.status}")
    if d.headers != n.headers:
        problems += [f"header {p}" for p in diff_values(d.headers, n.headers)]
    if d.body != n.body:
        problems += [f"body {p}" for p in diff_values(d.body, n.body)]
    return problems


# ---------------------------------------------------------------- running


@dataclass
class Run:
    direct: Side
    nestor: Side
    norm_direct: Normaliser
    norm_nestor: Normaliser
    outcomes: list[Outcome] = field(default_factory=list)
    log: Callable[[str], None] = print

    def step(self, step: Step) -> Outcome:
        recs = {}
        for side in (self.direct, self.nestor):
            if step.before:
                step.before(side)
            rec = send(side, step)
            recs[side.name] = rec
            if step.capture and not rec.error:
                try:
                    before = dict(side.vars)
                    step.capture(rec, side)
                    for k, v in side.vars.items():  # captured ids keep their name in diffs
                        if before.get(k) != v and isinstance(v, str) and (UUID_RE.fullmatch(v) or HEX32_RE.fullmatch(v)):
                            side.ids[canon(v)] = f"<{k}>"
                except Exception as e:  # noqa: BLE001 - reported as the step's problem
                    rec.error = f"capture failed: {type(e).__name__}: {e} (status {rec.status}, body {rec.body[:300]!r})"
        return self.judge(step, recs["direct"], recs["nestor"])

    def judge(self, step: Step, drec: Rec, nrec: Rec) -> Outcome:
        d = self.norm_direct.view(drec, step)
        n = self.norm_nestor.view(nrec, step)
        o = self.judge_views(step, d, n, drec.error, nrec.error)
        o.seconds = (drec.seconds, nrec.seconds)
        return o

    def judge_views(self, step: Step, d: View, n: View, derr: str | None = None, nerr: str | None = None) -> Outcome:
        if derr or nerr:
            o = Outcome(step, d, n, "error", [f"direct: {derr}" if derr else "", f"nestor: {nerr}" if nerr else ""])
        else:
            problems = compare(d, n)
            expect = (step.expect,) if isinstance(step.expect, int) else step.expect
            if expect and d.status not in expect:
                o = Outcome(step, d, n, "error", [f"the agent-server answered {d.status}, the step relies on {expect}"] + problems)
            elif not problems:
                o = Outcome(step, d, n, "identical")
            elif step.design is None:
                o = Outcome(step, d, n, "unexplained", problems)
            else:
                left = step.design.check(d, n)
                if left:
                    o = Outcome(step, d, n, "unexplained", [f"declared ({step.design.reason}) but: {p}" for p in left] + problems)
                else:
                    o = Outcome(step, d, n, "unsupported" if step.design.kind == "unsupported" else "design", problems)
        self.outcomes.append(o)
        if o.verdict in ("unexplained", "error"):
            self.log(f"fidelity: {o.verdict.upper()} {step.route or '-'} [{step.label}]: " + "; ".join(p for p in o.problems if p)[:1500])
        return o


# ---------------------------------------------------------------- WebSockets


def ws_exchange(side: Side, path: str, *, query: dict[str, Any] | None = None, header_key: str | None = None,
                extra_headers: dict[str, str] | None = None, first_frame: str | None = None,
                send_after: list[str] | None = None, quiet: float = 0.6, max_time: float = 8.0,
                until: Callable[[list[str]], bool] | None = None, label: str = "") -> Rec:
    """Open a socket, optionally send a first frame, collect text frames until the socket
    closes, ``until(frames)`` holds, or nothing arrives for ``quiet`` seconds (bounded by
    ``max_time``). A refused upgrade is returned with its HTTP status."""
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    url = side.ws_base + side.fmt(path)
    if query:
        url += "?" + urlencode(side.fmt(query))
    headers = dict(side.fmt(extra_headers or {}))
    if header_key is not None:
        headers["X-Session-API-Key"] = header_key
    frames: list[str] = []
    t0 = time.monotonic()
    try:
        ws = connect(url, additional_headers=headers, open_timeout=15, close_timeout=5, max_size=None)
    except InvalidStatus as e:
        r = e.response
        rec = Rec(r.status_code, list(r.headers.raw_items()), bytes(r.body or b""), time.monotonic() - t0)
        side.record(f"WS {path} {label}", rec)
        return rec
    except (OSError, TimeoutError) as e:
        rec = Rec(0, [], b"", time.monotonic() - t0, error=f"{type(e).__name__}: {e}")
        side.record(f"WS {path} {label}", rec)
        return rec
    handshake = list(ws.response.headers.raw_items()) if ws.response else []
    close: tuple[int | None, str | None] = (None, None)
    try:
        if first_frame is not None:
            ws.send(first_frame)
        for msg in send_after or []:
            ws.send(msg)
        deadline = time.monotonic() + max_time
        last = time.monotonic()
        while time.monotonic() < deadline:
            try:
                m = ws.recv(timeout=0.1)
            except TimeoutError:
                if time.monotonic() - last >= quiet:
                    break
                continue
            frames.append(m if isinstance(m, str) else m.decode("utf-8", "replace"))
            last = time.monotonic()
            if until and until(frames):
                break
    except ConnectionClosed as e:
        rcvd = e.rcvd
        close = (rcvd.code, rcvd.reason) if rcvd else (None, None)
    finally:
        if close == (None, None):
            try:
                ws.close()
            except Exception:  # noqa: BLE001
                pass
    rec = Rec(101, handshake, b"", time.monotonic() - t0, frames=frames, close=close)
    side.record(f"WS {path} {label}", rec)
    return rec


def ws_view(norm: Normaliser, rec: Rec, frame_view: Callable[[Any], Any] | None, ignore: tuple[str, ...] = (),
            unordered_frames: bool = False) -> View:
    norm.begin()
    if rec.error:
        return View(0, {}, {"transport-error": rec.error})
    if rec.frames is None:  # refused upgrade
        return View(rec.status, norm.headers(rec), norm.text(rec.body.decode("utf-8", "replace")))
    raw: list[Any] = []
    for f in rec.frames:
        try:
            v = json.loads(f)
        except ValueError:
            raw.append(f)
            continue
        v = frame_view(v) if frame_view else v
        if v is not None:
            raw.append(v)
    frames = [norm.text(v) if isinstance(v, str) else norm.value(v, ignore) for v in raw[:1]]
    if unordered_frames:
        frames += norm.multiset(raw[1:], ignore)
    else:
        frames += [norm.text(v) if isinstance(v, str) else norm.value(v, ignore) for v in raw[1:]]
    code, reason = rec.close
    return View(101, {}, {"frames": frames, "close_code": code, "close_reason": reason})


# ---------------------------------------------------------------- leak scan


@dataclass
class Leak:
    where: str
    what: str
    excerpt: str


def scan_for_leaks(side: Side, key: str, port: int) -> tuple[int, list[Leak]]:
    """Every recorded answer of ``side`` (status line, headers, body, frames, close reason)
    searched for the downstream's key, its port and its address. ``content-length`` is a
    number of bytes, not an address, and is not searched for the bare port."""
    port_re = re.compile(rf"(?<![0-9A-Za-z]){port}(?![0-9A-Za-z])")
    needles = [key, f"127.0.0.1:{port}", f"localhost:{port}"]
    leaks: list[Leak] = []
    n = 0
    for label, rec in list(side.transcript):
        n += 1
        parts: list[tuple[str, str]] = [("body", rec.body.decode("utf-8", "replace"))]
        for k, v in rec.headers:
            parts.append((f"header {k}", f"{k}: {v}"))
        for i, f in enumerate(rec.frames or []):
            parts.append((f"frame {i}", f))
        if rec.close and rec.close[1]:
            parts.append(("close reason", rec.close[1]))
        if rec.error:
            parts.append(("error", rec.error))
        for where, text in parts:
            for needle in needles:
                if needle in text:
                    i = text.index(needle)
                    leaks.append(Leak(f"{label} ({where})", needle, text[max(0, i - 60): i + 60]))
            if not where.startswith("header content-length"):
                m = port_re.search(text)
                if m:
                    leaks.append(Leak(f"{label} ({where})", f"port {port}", text[max(0, m.start() - 60): m.end() + 60]))
    return n, leaks


@dataclass
class WsScenario:
    """One WebSocket exchange, run on both sides at once."""

    route: str
    label: str
    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)  # for ws_exchange (values may hold ${var})
    key: str = "ok"  # ok | wrong | none: what the header/query/frame auth carries
    auth: str = "header"  # header | query | frame | none
    frame_view: Callable[[Any], Any] | None = None
    ignore: tuple[str, ...] = ()
    design: Design | None = None
    unordered: bool = False  # frames after the first compared as a multiset


def run_ws(run: Run, sc: WsScenario) -> Outcome:
    from concurrent.futures import ThreadPoolExecutor

    def one(side: Side) -> Rec:
        key = {"ok": side.api_key, "wrong": "wrong-" + side.api_key[::-1], "none": None}[sc.key]
        kw = dict(sc.kwargs)
        query = dict(kw.pop("query", {}) or {})
        header_key = None
        first = kw.pop("first_frame", None)
        if sc.auth == "header":
            header_key = key
        elif sc.auth == "query" and key is not None:
            query["session_api_key"] = key
        elif sc.auth == "frame" and first is None:
            first = json.dumps({"type": "auth", "session_api_key": key})
        return ws_exchange(side, sc.path, query=query or None, header_key=header_key, first_frame=first,
                           label=sc.label, **kw)

    with ThreadPoolExecutor(2) as ex:
        fd, fn = ex.submit(one, run.direct), ex.submit(one, run.nestor)
        drec, nrec = fd.result(), fn.result()
    step = Step(route=sc.route, label=sc.label, design=sc.design, method="WS", path=sc.path)
    d = ws_view(run.norm_direct, drec, sc.frame_view, sc.ignore, sc.unordered)
    n = ws_view(run.norm_nestor, nrec, sc.frame_view, sc.ignore, sc.unordered)
    return run.judge_views(step, d, n, drec.error, nrec.error)
