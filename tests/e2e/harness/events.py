"""Compare the events a client received with the server's persisted log.

What "persisted" means (agent-server 1.58.2): every event appended to the conversation's
``EventLog`` (``events/event-NNNNN-<id>.json``), i.e. exactly what
``GET /api/conversations/{id}/events/search`` pages through, in log order. That includes the
per-field ``ConversationStateUpdateEvent``s (``execution_status``, ``stats``,
``last_user_message_id``, ...). It excludes events that are only *published*:

* ``ConversationStateUpdateEvent`` with ``key == "full_state"`` (a snapshot synthesised per
  subscriber on connect and re-published after runs / pauses);
* the minimal ``ConversationStateUpdateEvent{key: execution_status, value: idle}`` sent on
  connect when the conversation object is not live (rare; opt-in tolerance below);
* ``StreamingDeltaEvent`` (token deltas, only with ``llm.stream=True``);
* ``LLMCompletionLogEvent`` (only with ``log_completions``).

The robust test is therefore by *id*, not by type: an event is persisted iff its id is in the
REST log. Received events whose id is not in the log must be one of the transient shapes above,
otherwise something fabricated or lost them (reported as ``unexpected``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

TRANSIENT_KINDS = frozenset({"StreamingDeltaEvent", "LLMCompletionLogEvent"})


def _get(ev: Any, name: str, default: Any = None) -> Any:
    if isinstance(ev, dict):
        return ev.get(name, default)
    return getattr(ev, name, default)


def event_kind(ev: Any) -> str:
    if isinstance(ev, dict):
        return str(ev.get("kind", ""))
    return type(ev).__name__


def event_key(ev: Any) -> str | None:
    return _get(ev, "key") if event_kind(ev) == "ConversationStateUpdateEvent" else None


def is_transient_shape(ev: Any, tolerate_unpersisted_state_updates: bool = False) -> bool:
    """True if ``ev`` is of a kind the server publishes without persisting."""
    kind = event_kind(ev)
    if kind in TRANSIENT_KINDS:
        return True
    if kind == "ConversationStateUpdateEvent":
        if event_key(ev) == "full_state":
            return True
        return tolerate_unpersisted_state_updates
    return False


def describe(ev: Any) -> str:
    k = event_kind(ev)
    key = event_key(ev)
    return f"{k}{'[' + key + ']' if key else ''}#{str(_get(ev, 'id'))[:8]}"


class EventRecorder:
    """An SDK callback that records every event it is handed, in order, thread-safely."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[Any] = []
        self._times: list[float] = []
        self._cond = threading.Condition(self._lock)

    def __call__(self, event: Any) -> None:
        with self._cond:
            self._events.append(event)
            self._times.append(time.monotonic())
            self._cond.notify_all()

    @property
    def events(self) -> list[Any]:
        with self._lock:
            return list(self._events)

    def wait_for(self, predicate, timeout: float) -> Any:
        """Wait (bounded) until some recorded event satisfies ``predicate``; return it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            checked = 0
            while True:
                for ev in self._events[checked:]:
                    if predicate(ev):
                        return ev
                checked = len(self._events)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no matching event after {timeout}s ({len(self._events)} recorded)")
                self._cond.wait(remaining)


@dataclass
class EventComparison:
    """Result of comparing a client's received events with the REST log."""

    rest_ids: list[str]
    received: list[str]  # descriptions, in receipt order, all events
    persisted_received_ids: list[str]  # received events that are in the log, in receipt order (with repeats)
    duplicates: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the log, never received
    unexpected: list[str] = field(default_factory=list)  # received, not in the log, not transient
    mismatched: list[str] = field(default_factory=list)  # same id, different kind/timestamp
    order_errors: list[str] = field(default_factory=list)
    transient_count: int = 0

    def problems(self, *, strict_order: bool = True, require_complete: bool = True) -> list[str]:
        out = []
        if self.duplicates:
            out.append(f"received twice: {self.duplicates}")
        if require_complete and self.missing:
            out.append(f"persisted but never received: {self.missing}")
        if self.unexpected:
            out.append(f"received, not persisted, not a transient kind: {self.unexpected}")
        if self.mismatched:
            out.append(f"content differs from the log: {self.mismatched}")
        if strict_order and self.order_errors:
            out.append(f"receipt order differs from log order: {self.order_errors}")
        return out

    def assert_ok(self, *, strict_order: bool = True, require_complete: bool = True) -> None:
        probs = self.problems(strict_order=strict_order, require_complete=require_complete)
        if probs:
            raise AssertionError(
                "client events do not match GET /events/search:\n  "
                + "\n  ".join(probs)
                + f"\nlog ({len(self.rest_ids)}): {self.rest_ids}\nreceived ({len(self.received)}): {self.received}"
            )


def compare_events(
    received: list[Any],
    rest_events: list[dict[str, Any]],
    *,
    tolerate_unpersisted_state_updates: bool = False,
) -> EventComparison:
    """Compare events a client got (SDK ``Event`` objects or raw dicts, in receipt order)
    with the full REST log (``rest.all_events``). Nothing is asserted here; call
    ``.assert_ok(strict_order=..., require_complete=...)``.

    * ``strict_order``: the persisted events were received in log order. Holds for an
      uninterrupted live socket; after a reconnect the SDK replays missed events late, so a
      fault-injection test should check ``strict_order=False`` and rely on no-gap/no-dup.
    * ``require_complete``: every logged event was received. For a client that subscribed
      after history existed (the SDK only calls back for events after it connected), pass
      ``require_complete=False`` or compare against a suffix of the log.
    """
    by_id = {e["id"]: e for e in rest_events}
    rest_ids = [e["id"] for e in rest_events]
    pos = {eid: i for i, eid in enumerate(rest_ids)}
    cmp = EventComparison(rest_ids=rest_ids, received=[describe(e) for e in received], persisted_received_ids=[])
    seen: set[str] = set()
    for ev in received:
        eid = str(_get(ev, "id"))
        if eid in by_id:
            cmp.persisted_received_ids.append(eid)
            if eid in seen:
                cmp.duplicates.append(describe(ev))
            seen.add(eid)
            logged = by_id[eid]
            if event_kind(ev) != logged.get("kind") or str(_get(ev, "timestamp")) != str(logged.get("timestamp")):
                cmp.mismatched.append(
                    f"{describe(ev)} vs log {logged.get('kind')}@{logged.get('timestamp')} (got @{_get(ev, 'timestamp')})"
                )
        elif is_transient_shape(ev, tolerate_unpersisted_state_updates):
            cmp.transient_count += 1
        else:
            cmp.unexpected.append(describe(ev))
    cmp.missing = [describe(by_id[i]) for i in rest_ids if i not in seen]
    last = -1
    for eid in dict.fromkeys(cmp.persisted_received_ids):  # first receipt of each id
        p = pos[eid]
        if p < last:
            cmp.order_errors.append(f"{describe(by_id[eid])} (log #{p}) after log #{last}")
        last = max(last, p)
    return cmp


def assert_sdk_consistent(
    callback_events: list[Any],
    cached_events: list[Any],
    rest_events: list[dict[str, Any]],
    *,
    strict_order: bool = True,
    tolerate_unpersisted_state_updates: bool = False,
) -> EventComparison:
    """The standard end-of-test check for one SDK ``RemoteConversation``:

    * ``callback_events`` (an ``EventRecorder``'s list): every persisted event exactly once,
      nothing unknown, and (``strict_order``) in log order;
    * ``cached_events`` (``list(conversation.state.events)``): the SDK's own cache, which is
      timestamp-sorted and also keeps the ``full_state`` snapshots it got, so never strict.

    A fault-injection test (downstream killed mid-run, SDK reconnected) passes
    ``strict_order=False``: the SDK replays what it missed after reconnecting, late but once.
    """
    cmp = compare_events(callback_events, rest_events, tolerate_unpersisted_state_updates=tolerate_unpersisted_state_updates)
    cmp.assert_ok(strict_order=strict_order)
    compare_events(cached_events, rest_events, tolerate_unpersisted_state_updates=tolerate_unpersisted_state_updates).assert_ok(strict_order=False)
    return cmp
