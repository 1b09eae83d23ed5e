"""Build real SDK objects (``RemoteWorkspace`` + ``RemoteConversation``) against a target."""

from __future__ import annotations

import os
import threading

# Must be set before litellm is imported (via openhands.sdk), else it fetches a price map
# from the internet at import time (+7..10 s offline, plus warnings).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("OPENHANDS_SUPPRESS_BANNER", "1")

from pydantic import SecretStr  # noqa: E402

from openhands.sdk import LLM, Agent, Conversation  # noqa: E402
from openhands.sdk.tool import Tool  # noqa: E402
from openhands.sdk.workspace import RemoteWorkspace  # noqa: E402
from openhands.tools.terminal import TerminalTool  # noqa: E402,F401  (registers "terminal" client-side)

FAKE_MODEL = "openai/fake"


def make_agent(llm_base_url: str, *, stream: bool = False) -> Agent:
    llm = LLM(
        usage_id="agent",
        model=FAKE_MODEL,
        base_url=llm_base_url,
        api_key=SecretStr("fake-llm-key"),
        stream=stream,
        num_retries=0,
        timeout=60,
    )
    return Agent(llm=llm, tools=[Tool(name="terminal")])


def make_workspace(base_url: str, api_key: str | None, working_dir: str) -> RemoteWorkspace:
    return RemoteWorkspace(host=base_url, api_key=api_key, working_dir=working_dir, read_timeout=120.0)


def open_conversation(target, llm_base_url: str, label: str, *, callbacks=None, stream: bool = False, token_callbacks=None):
    """Create a conversation through the SDK exactly as users do. Returns (conversation, workspace).

    ``delete_on_close=False``: the tests delete explicitly and check the 404 afterwards (the
    ``Conversation`` factory defaults to deleting on close)."""
    ws = make_workspace(target.base_url, target.api_key, target.working_dir_for(label))
    kwargs = {}
    if token_callbacks:
        kwargs["token_callbacks"] = token_callbacks
    conv = Conversation(
        agent=make_agent(llm_base_url, stream=stream),
        workspace=ws,
        callbacks=list(callbacks or []),
        visualizer=None,
        delete_on_close=False,
        max_iteration_per_run=50,
        **kwargs,
    )
    return conv, ws


def start_closing(conversations):
    """Start ``close()`` on several conversations in background threads; return a ``join()``.

    SDK quirk: ``RemoteConversation.close()`` sets a stop flag and joins its websocket thread
    with a 5 s timeout, but that thread only checks the flag when a frame arrives or the socket
    closes. On a quiet socket every close() therefore takes the full 5 s. Deleting the
    conversation meanwhile makes the server close the socket, so the thread ends at once:
    ``join = start_closing(convs); <DELETE them>; join()``."""
    threads = [threading.Thread(target=c.close, daemon=True, name="sdk-close") for c in list(conversations)]
    for t in threads:
        t.start()

    def join(timeout: float = 15.0) -> None:
        for t in threads:
            t.join(timeout=timeout)

    return join


def close_all(conversations) -> None:
    """``close()`` several conversations in parallel and wait (<= ~5 s, see start_closing)."""
    start_closing(conversations)()
