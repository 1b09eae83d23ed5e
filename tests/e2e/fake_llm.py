"""A scripted, OpenAI-compatible fake LLM for end-to-end tests.

The agent-server's LLM (litellm, model ``openai/<anything>``, ``base_url`` pointing here)
POSTs ``{base_url}/chat/completions``. The script is driven entirely by the conversation's
own messages, so one fake LLM can serve many conversations at once:

* a request without ``tools`` is the auto-title call (or ``ask_agent``): plain text;
* otherwise the *task message* is the newest user message (the newest one containing a
  ``RUN:`` line wins if there is one). Every line ``RUN: <cmd>`` in it is one ``terminal``
  tool call; ``k`` = number of tool results after the task message; while ``k < len(cmds)``
  the answer is a ``terminal`` call running ``cmds[k]``, then a ``finish`` call.
* optional directives in the task message: ``FINISH: <text>`` (the finish message) and
  ``DELAY: <seconds>`` (sleep before answering each agent step of this conversation).

Both ``stream: false`` (one JSON completion) and ``stream: true`` (SSE
``chat.completion.chunk`` frames ending in ``data: [DONE]``) are served.

Thread-safe; every request is recorded (``requests``). ``step_delay`` adds a global delay
to agent steps, and ``hold()`` / ``release()`` park agent steps until released (bounded),
so a test can kill something while a run is in flight.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

RUN_RE = re.compile(r"^\s*RUN:\s?(.*?)\s*$", re.MULTILINE)
FINISH_RE = re.compile(r"^\s*FINISH:\s?(.*?)\s*$", re.MULTILINE)
DELAY_RE = re.compile(r"^\s*DELAY:\s*([0-9.]+)\s*$", re.MULTILINE)

TITLE_TEXT = "Fake conversation title"
HOLD_MAX_SECONDS = 120.0  # a held step never waits longer than this


def message_text(msg: dict[str, Any]) -> str:
    """Concatenated text of an OpenAI chat message (string or content-part list)."""
    content = msg.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") in ("text", "input_text"):
            parts.append(str(part.get("text", "")))
        elif isinstance(part, str):
            parts.append(part)
    return "\n".join(parts)


@dataclass
class Decision:
    """What the fake LLM answers to one request."""

    kind: str  # "text" | "tool"
    text: str = ""
    tool_name: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)
    delay: float = 0.0
    step_index: int = 0  # index of the tool call for this task (0-based), finish = len(cmds)


def _tool_names(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for t in tools or []:
        fn = t.get("function") if isinstance(t, dict) else None
        if isinstance(fn, dict) and fn.get("name"):
            out[fn["name"]] = fn
        elif isinstance(t, dict) and t.get("name"):  # responses-API style tool
            out[t["name"]] = t
    return out


def _fill_required(fn_schema: dict[str, Any] | None, args: dict[str, Any]) -> dict[str, Any]:
    """Fill required parameters we do not script (e.g. ``security_risk``, ``summary``)."""
    if not fn_schema:
        return args
    params = fn_schema.get("parameters") or {}
    props = params.get("properties") or {}
    for name in params.get("required") or []:
        if name in args:
            continue
        spec = props.get(name) or {}
        if name == "security_risk" or "LOW" in (spec.get("enum") or []):
            args[name] = "LOW"
        elif spec.get("type") == "boolean":
            args[name] = False
        elif spec.get("type") in ("integer", "number"):
            args[name] = 0
        else:
            args[name] = ""
    return args


def decide(body: dict[str, Any]) -> Decision:
    """Pure function: the scripted answer for one chat-completions request body."""
    messages = body.get("messages") or []
    tools = _tool_names(body.get("tools") or [])
    if not tools:
        return Decision(kind="text", text=TITLE_TEXT)

    user_idx = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    task_idx = None
    for i in reversed(user_idx):
        if RUN_RE.search(message_text(messages[i])):
            task_idx = i
            break
    if task_idx is None and user_idx:
        task_idx = user_idx[-1]
    task_text = message_text(messages[task_idx]) if task_idx is not None else ""
    cmds = RUN_RE.findall(task_text)
    fin = FINISH_RE.search(task_text)
    dl = DELAY_RE.search(task_text)
    delay = float(dl.group(1)) if dl else 0.0
    done = 0
    if task_idx is not None:
        done = sum(1 for m in messages[task_idx + 1 :] if m.get("role") == "tool")

    if done < len(cmds) and "terminal" in tools:
        args = _fill_required(tools.get("terminal"), {"command": cmds[done]})
        return Decision(kind="tool", text=f"Step {done + 1}: running {cmds[done]}", tool_name="terminal",
                        arguments=args, delay=delay, step_index=done)

    finish_msg = fin.group(1) if fin else f"done: ran {len(cmds)} command(s)"
    if "finish" in tools:
        args = _fill_required(tools.get("finish"), {"message": finish_msg})
        return Decision(kind="tool", text="All steps done.", tool_name="finish", arguments=args, delay=delay,
                        step_index=len(cmds))
    return Decision(kind="text", text=finish_msg, delay=delay, step_index=len(cmds))


@dataclass
class RecordedRequest:
    t: float
    path: str
    body: dict[str, Any]
    decision: Decision | None


class FakeLLM:
    """Runs the fake LLM HTTP server in a background thread on 127.0.0.1.

    ``extra_hosts``: further local addresses to listen on, same port (e.g. the Docker bridge
    gateway, so agent-servers in containers reach it as ``host.docker.internal``); never a
    wildcard address, so the fake LLM stays reachable from this machine only.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, step_delay: float = 0.0,
                 extra_hosts: "list[str] | tuple[str, ...]" = ()):
        self.step_delay = step_delay
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._released = threading.Event()
        self._released.set()
        self._held = 0
        handler = self._make_handler()
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._extra = []
        for h in extra_hosts:
            if h in ("0.0.0.0", "::", ""):
                raise ValueError("the fake LLM does not listen on a wildcard address")
            x = ThreadingHTTPServer((h, self.port), handler)
            x.daemon_threads = True
            self._extra.append(x)
        self._thread: threading.Thread | None = None
        self._extra_threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        """What to put into ``LLM(base_url=...)`` (litellm appends /chat/completions)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "FakeLLM":
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-llm", daemon=True)
        self._thread.start()
        for x in self._extra:
            t = threading.Thread(target=x.serve_forever, name="fake-llm-extra", daemon=True)
            t.start()
            self._extra_threads.append(t)
        return self

    def stop(self) -> None:
        self._released.set()
        for srv in [self._server, *self._extra]:
            srv.shutdown()
            srv.server_close()
        for t in [self._thread, *self._extra_threads]:
            if t:
                t.join(timeout=5)

    def __enter__(self) -> "FakeLLM":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- control ---------------------------------------------------------------------
    def hold(self) -> None:
        """Park every following agent step (tool/finish answer) until ``release()``."""
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    @property
    def held(self) -> int:
        """Agent steps currently parked by ``hold()``."""
        with self._lock:
            return self._held

    def wait_held(self, n: int, timeout: float) -> None:
        """Wait (bounded) until ``n`` agent steps are parked, i.e. ``n`` runs are mid-step."""
        deadline = time.monotonic() + timeout
        while self.held < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.held} of {n} agent steps reached the fake LLM in {timeout}s")
            time.sleep(0.02)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def agent_requests(self) -> list[RecordedRequest]:
        """Requests that were agent steps (had tools), not title calls."""
        return [r for r in self.requests if r.decision is not None and r.decision.kind == "tool"]

    def tool_calls(self, tool_name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for r in self.agent_requests():
            d = r.decision
            if tool_name is None or d.tool_name == tool_name:
                out.append({"tool": d.tool_name, "arguments": d.arguments})
        return out

    # -- HTTP --------------------------------------------------------------------------
    def _record(self, path: str, body: dict[str, Any], decision: Decision | None) -> None:
        with self._lock:
            self._requests.append(RecordedRequest(time.time(), path, body, decision))

    def _make_handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # quiet
                pass

            def _send_json(self, code: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self._send_json(200, {"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": "nestor-e2e"}]})
                else:
                    self._send_json(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    self._send_json(400, {"error": {"message": "bad json"}})
                    return
                if not self.path.split("?")[0].rstrip("/").endswith("/chat/completions"):
                    fake._record(self.path, body, None)
                    self._send_json(404, {"error": {"message": f"fake LLM serves only chat/completions, not {self.path}"}})
                    return
                decision = decide(body)
                fake._record(self.path, body, decision)
                if decision.kind == "tool":
                    delay = fake.step_delay + decision.delay
                    if delay > 0:
                        time.sleep(delay)
                    if not fake._released.is_set():
                        with fake._lock:
                            fake._held += 1
                        try:
                            fake._released.wait(timeout=HOLD_MAX_SECONDS)
                        finally:
                            with fake._lock:
                                fake._held -= 1
                model = body.get("model") or "fake"
                if body.get("stream"):
                    self._send_stream(model, decision, body)
                else:
                    self._send_json(200, completion(model, decision))

            def _send_stream(self, model: str, decision: Decision, body: dict[str, Any]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                try:
                    for chunk in stream_chunks(model, decision, include_usage):
                        self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                        self.wfile.flush()
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass

        return Handler


USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


def completion(model: str, d: Decision) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant"}
    if d.kind == "text":
        msg["content"] = d.text
        finish = "stop"
    else:
        msg["content"] = d.text or None
        msg["tool_calls"] = [
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": d.tool_name, "arguments": json.dumps(d.arguments)},
            }
        ]
        finish = "tool_calls"
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
        "usage": dict(USAGE),
    }


def stream_chunks(model: str, d: Decision, include_usage: bool = False):
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    if d.kind == "text":
        yield chunk({"role": "assistant", "content": ""})
        words = d.text.split(" ")
        for i, w in enumerate(words):
            yield chunk({"content": w if i == 0 else " " + w})
        yield chunk({}, "stop")
    else:
        args = json.dumps(d.arguments)
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        if d.text:  # some "thinking aloud" text first, as real models do (gives token deltas)
            yield chunk({"role": "assistant", "content": ""})
            for i, w in enumerate(d.text.split(" ")):
                yield chunk({"content": w if i == 0 else " " + w})
        yield chunk(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"index": 0, "id": call_id, "type": "function", "function": {"name": d.tool_name, "arguments": ""}}
                ],
            }
        )
        mid = max(1, len(args) // 2)
        for piece in (args[:mid], args[mid:]):
            yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        yield chunk({}, "tool_calls")
    if include_usage:
        yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": dict(USAGE)}


def main() -> None:  # pragma: no cover - manual use
    ap = argparse.ArgumentParser(description="Run the scripted fake LLM standalone.")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--step-delay", type=float, default=0.0)
    a = ap.parse_args()
    fake = FakeLLM(port=a.port, step_delay=a.step_delay).start()
    print(fake.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
