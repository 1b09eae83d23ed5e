"""Thin REST helpers over the agent-server API (works against nestor unchanged)."""

from __future__ import annotations

import time
from typing import Any, Iterable

import httpx

MAX_PAGES = 1000  # bound on every paging loop


def client(base_url: str, api_key: str | None, timeout: float = 30.0) -> httpx.Client:
    headers = {"X-Session-API-Key": api_key} if api_key else {}
    return httpx.Client(base_url=base_url, headers=headers, timeout=timeout)


def get_conversation(c: httpx.Client, cid: str) -> httpx.Response:
    return c.get(f"/api/conversations/{cid}")


def conversation_info(c: httpx.Client, cid: str) -> dict[str, Any]:
    r = get_conversation(c, cid)
    r.raise_for_status()
    return r.json()


def search_conversations_all_pages(c: httpx.Client, limit: int = 1, **params: Any) -> tuple[list[dict], list[int]]:
    """Follow ``next_page_id`` through every page. Returns (items, page sizes).

    Fails on a repeated page token or a conversation listed twice (a broken cursor
    would otherwise loop or duplicate)."""
    items: list[dict] = []
    sizes: list[int] = []
    seen_tokens: set[str] = set()
    page_id: str | None = None
    for _ in range(MAX_PAGES):
        q: dict[str, Any] = {"limit": limit, **params}
        if page_id:
            q["page_id"] = page_id
        r = c.get("/api/conversations/search", params=q)
        r.raise_for_status()
        data = r.json()
        page = data["items"]
        assert len(page) <= limit, f"page larger than limit={limit}: {len(page)}"
        items.extend(page)
        sizes.append(len(page))
        page_id = data.get("next_page_id")
        if not page_id:
            break
        assert page_id not in seen_tokens, f"conversation search cursor repeats: {page_id}"
        seen_tokens.add(page_id)
    else:
        raise AssertionError(f"conversation search did not end after {MAX_PAGES} pages")
    ids = [i["id"] for i in items]
    dupes = {i for i in ids if ids.count(i) > 1}
    assert not dupes, f"conversations listed twice across pages: {dupes}"
    return items, sizes


def count_conversations(c: httpx.Client, **params: Any) -> int:
    r = c.get("/api/conversations/count", params=params)
    r.raise_for_status()
    return int(r.json())


def all_events(c: httpx.Client, cid: str, limit: int = 100, **params: Any) -> list[dict[str, Any]]:
    """Every event of a conversation via ``/events/search`` paging (log order)."""
    out: list[dict[str, Any]] = []
    page_id: str | None = None
    for _ in range(MAX_PAGES):
        q: dict[str, Any] = {"limit": limit, **params}
        if page_id:
            q["page_id"] = page_id
        r = c.get(f"/api/conversations/{cid}/events/search", params=q)
        r.raise_for_status()
        data = r.json()
        out.extend(data["items"])
        page_id = data.get("next_page_id")
        if not page_id:
            break
    else:
        raise AssertionError(f"event search did not end after {MAX_PAGES} pages")
    ids = [e["id"] for e in out]
    assert len(ids) == len(set(ids)), "events/search returned an event twice"
    return out


def workspace_dir(c: httpx.Client, cid: str) -> str:
    return conversation_info(c, cid)["workspace"]["working_dir"]


def download_workspace_file(c: httpx.Client, cid: str, relative_path: str) -> httpx.Response:
    """Read a file of the conversation's workspace through the conversation-scoped route
    ``GET /api/conversations/{id}/file/download?path=<abs>`` (path must be inside its
    ``working_dir``), so it works wherever the conversation actually runs."""
    base = workspace_dir(c, cid).rstrip("/")
    return c.get(f"/api/conversations/{cid}/file/download", params={"path": f"{base}/{relative_path}"})


def delete_conversation(c: httpx.Client, cid: str) -> httpx.Response:
    return c.delete(f"/api/conversations/{cid}")


def wait_for_status(c: httpx.Client, cid: str, statuses: Iterable[str], timeout: float = 60.0, interval: float = 0.2) -> dict[str, Any]:
    wanted = set(statuses)
    deadline = time.monotonic() + timeout
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = get_conversation(c, cid)
        if r.status_code == 200:
            info = r.json()
            if info.get("execution_status") in wanted:
                return info
        time.sleep(interval)
    raise TimeoutError(f"conversation {cid} not in {wanted} after {timeout}s (last: {info.get('execution_status')})")
