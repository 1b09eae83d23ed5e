"""Self-test of the scripted fake LLM (no agent-server): the script logic, and that litellm -
the client the agent-server uses - parses both its JSON and its SSE answers into tool calls."""

from __future__ import annotations

import json

import pytest

from fake_llm import TITLE_TEXT, FakeLLM, decide

TOOLS = [
    {"type": "function", "function": {"name": "terminal", "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}},
    {"type": "function", "function": {"name": "finish", "parameters": {"type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"]}}},
]


def _user(text):
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def _tool_turn(i):
    return [
        {"role": "assistant", "content": None, "tool_calls": [{"id": f"c{i}", "type": "function", "function": {"name": "terminal", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": f"c{i}", "content": "ok"},
    ]


def test_decide_script():
    assert decide({"messages": [_user("RUN: ls")]}).text == TITLE_TEXT  # no tools: title call
    task = _user("hi\nRUN: echo a\nRUN: echo b\nFINISH: bye\nDELAY: 0.25")
    msgs = [{"role": "system", "content": "s"}, task]
    d = decide({"messages": msgs, "tools": TOOLS})
    assert (d.tool_name, d.arguments["command"], d.delay) == ("terminal", "echo a", 0.25)
    d = decide({"messages": msgs + _tool_turn(1), "tools": TOOLS})
    assert (d.tool_name, d.arguments["command"]) == ("terminal", "echo b")
    d = decide({"messages": msgs + _tool_turn(1) + _tool_turn(2), "tools": TOOLS})
    assert (d.tool_name, d.arguments) == ("finish", {"message": "bye"})
    # a later user message without RUN: lines does not restart the script
    d = decide({"messages": msgs + _tool_turn(1) + _tool_turn(2) + [_user("thanks")], "tools": TOOLS})
    assert d.tool_name == "finish"
    # required params we do not script are filled (e.g. security_risk)
    tools = json.loads(json.dumps(TOOLS))
    fn = tools[0]["function"]["parameters"]
    fn["properties"]["security_risk"] = {"type": "string", "enum": ["LOW", "MEDIUM", "HIGH"]}
    fn["required"].append("security_risk")
    assert decide({"messages": msgs, "tools": tools}).arguments["security_risk"] == "LOW"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_litellm_parses_fake_answers(stream):
    import litellm

    with FakeLLM() as fake:
        kw = dict(model="openai/fake", api_base=fake.base_url, api_key="x", tools=TOOLS, stream=stream)
        resp = litellm.completion(messages=[_user("RUN: echo hi")], **kw)
        if stream:
            resp = litellm.stream_chunk_builder(list(resp))
        call = resp.choices[0].message.tool_calls[0]
        assert call.function.name == "terminal"
        assert json.loads(call.function.arguments) == {"command": "echo hi"}
        title = litellm.completion(messages=[_user("hello")], model="openai/fake", api_base=fake.base_url, api_key="x", stream=stream)
        if stream:
            title = litellm.stream_chunk_builder(list(title))
        assert title.choices[0].message.content == TITLE_TEXT
        assert len(fake.requests) == 2
