"""Regenerate crates/settings/assets/models.json from an installed agent-server 1.58.2.

Run with the agent-server's venv python:
    LITELLM_LOCAL_MODEL_COST_MAP=True $VENV/bin/python tools/gen_model_schemas.py > assets/models.json

Emits the pydantic *validation* JSON schemas of the models nestor validates against, with
documentation keywords stripped, and with a `default` filled in from a default instance for
fields whose default comes from a factory (pydantic leaves those out of the schema).
A default that is "now" (AgentContext.current_datetime) is written as the string "__now__".
"""
import json, sys, typing, inspect
from datetime import datetime
from pydantic import BaseModel
from openhands.sdk.settings.model import OpenHandsAgentSettings, ACPAgentSettings, ConversationSettings
from openhands.sdk.mcp.config import MCPServer
from openhands.sdk.settings.api_models import MCPServerPatch
from openhands.sdk.llm import LLM
from openhands.sdk.llm.meta_profile_store import MetaProfile
from openhands.sdk.profiles.agent_profile import OpenHandsAgentProfile, ACPAgentProfile

ROOTS = {
    "OpenHandsAgentSettings": OpenHandsAgentSettings,
    "ACPAgentSettings": ACPAgentSettings,
    "ConversationSettings": ConversationSettings,
    "MCPServer": MCPServer,
    "MCPServerPatch": MCPServerPatch,
    "LLM": LLM,
    "MetaProfile": MetaProfile,
    "OpenHandsAgentProfile": OpenHandsAgentProfile,
    "ACPAgentProfile": ACPAgentProfile,
}
DOC = {"title", "description", "examples", "label", "variant", "openhands_settings", "depends_on",
       "prominence", "acp_compatible", "openhands_settings_section", "key"}

classes = {}
def collect(tp, seen=set()):
    if id(tp) in seen: return
    seen.add(id(tp))
    if inspect.isclass(tp) and issubclass(tp, BaseModel):
        classes.setdefault(tp.__name__, tp)
        for f in tp.model_fields.values():
            collect(f.annotation)
        for sub in tp.__subclasses__():
            collect(sub)
        return
    for a in typing.get_args(tp):
        collect(a)
for c in ROOTS.values(): collect(c)

def strip(o, in_props=False):
    if isinstance(o, dict):
        out = {}
        for k, v in o.items():
            if not in_props and k in DOC and not isinstance(v, dict) or (not in_props and k in ("title","description","examples")):
                continue
            out[k] = strip(v, k in ("properties", "$defs", "mapping"))
        return out
    if isinstance(o, list):
        return [strip(v) for v in o]
    return o

from openhands.sdk.mcp.config import _MCPBaseModel

def fill_defaults(name, sch):
    cls = classes.get(name)
    if cls is not None and issubclass(cls, _MCPBaseModel):
        sch["x-compact"] = True
    if cls is not None and "properties" in sch:
        keys = [f.alias or n for n, f in cls.model_fields.items() if not f.exclude]
        computed = list(getattr(cls, "model_computed_fields", {}).keys())
        if name == "LLM":
            computed.append("is_subscription")  # a serialized property
        if set(keys) != set(sch["properties"]) or computed:
            sch["x-dump-keys"] = keys + computed
    if cls is None or "properties" not in sch: return
    inst = None
    try:
        inst = cls().model_dump(mode="json", context={"expose_secrets": "plaintext"})
    except Exception:
        try:
            inst = cls.model_construct().model_dump(mode="json", warnings=False)
        except Exception:
            inst = None
    for fname, f in cls.model_fields.items():
        key = f.alias or fname
        p = sch["properties"].get(key)
        if p is None or "default" in p or f.is_required():
            continue
        if f.default_factory is not None:
            try:
                v = f.default_factory()
            except TypeError:
                continue
            if isinstance(v, datetime):
                p["default"] = "__now__"
            elif inst is not None and key in inst:
                p["default"] = inst[key]
            else:
                try:
                    p["default"] = json.loads(json.dumps(v.model_dump(mode="json") if isinstance(v, BaseModel) else v))
                except Exception:
                    pass

out = {}
for name, cls in ROOTS.items():
    s = cls.model_json_schema(mode="validation")
    fill_defaults(name, s)
    for dn, ds in s.get("$defs", {}).items():
        fill_defaults(dn, ds)
    out[name] = strip(s)

def now_sentinel(o):
    if isinstance(o, dict):
        return {k: ("__now__" if k == "current_datetime" and isinstance(v, str) else now_sentinel(v)) for k, v in o.items()}
    if isinstance(o, list):
        return [now_sentinel(v) for v in o]
    return o
out = now_sentinel(out)
# AgentContext.secrets: bare-string entries are secrets too (encrypted by the field's own
# serializer, so the schema does not say so).
for sch in out.values():
    ac = sch.get("$defs", {}).get("AgentContext")
    if ac:
        for br in ac["properties"]["secrets"]["anyOf"]:
            if br.get("type") == "object":
                for alt in br["additionalProperties"]["anyOf"]:
                    if alt.get("type") == "string":
                        alt["format"] = "password"
json.dump(out, sys.stdout, separators=(",", ":"), sort_keys=False)
