"""Tool calling for chat completions: what to render, what to constrain, how to read a call.

- The tools are rendered by the model's own chat template; a template that ignores them
  (SmolLM2's does) cannot offer tools, and a request that asks the model to use them gets a
  400 saying so.
- `tool_choice` "none": tools are rendered (where the template can) and never called.
- A named function: the output is constrained (structured outputs) to that function's
  `parameters` schema, so the arguments always parse; they stream as argument deltas.
- "required": the output is constrained to `{"name": <one of the tools>, "arguments": {...}}`.
- "auto": free text; an output that is a call (`{"name": ..., "arguments": ...}`, optionally
  inside `<tool_call>...</tool_call>`, the Hermes convention) naming a given tool is returned
  as `tool_calls`; anything else is content. In a stream, "auto" output is content.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from lorafold.server.api.openai_fields import NamedToolChoice, Tool
from lorafold.server.engine.sampling_params import GrammarSpec
from lorafold.server.models.chat import ChatTemplateError, renders_tools

_HERMES = re.compile(r"^\s*<tool_call>\s*(?P<body>.*?)\s*</tool_call>\s*$", re.DOTALL)


@dataclass(slots=True)
class ToolPlan:
    render: bool = False  # pass the tools to the chat template
    grammar: GrammarSpec | None = None  # constraint forcing a call
    forced: bool = False  # the output is a call, whatever the model would say
    named: str | None = None  # the function a named tool_choice forces (output = its arguments)
    tools: dict[str, dict] = field(default_factory=dict)  # name -> parameters schema
    call_id: str = ""


def plan_tools(tokenizer: object, messages: Sequence[Mapping], tools: list[Tool] | None,
               tool_choice: str | NamedToolChoice | None) -> ToolPlan:
    """Raises ChatTemplateError (a 400) when the request asks for what cannot be served."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise ChatTemplateError("tool_choice needs tools: send the functions the model may call in `tools`")
        return ToolPlan()
    supported = renders_tools(tokenizer)
    choice = tool_choice or "auto"
    if choice == "none":
        return ToolPlan(render=supported)
    if not supported:
        raise ChatTemplateError("this model's chat template does not render tools, so it cannot call them; "
                                "serve a model whose template supports tools, or drop `tools`")
    schemas = {t.function.name: t.function.parameters for t in tools}
    plan = ToolPlan(render=True, tools=schemas, call_id=f"call_{uuid.uuid4().hex[:24]}")
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in schemas:
            raise ChatTemplateError(f"tool_choice names {name!r}, which is not among the tools: {sorted(schemas)}")
        plan.forced, plan.named = True, name
        plan.grammar = GrammarSpec("json_schema", json.dumps(schemas[name] or {"type": "object"}))
    elif choice == "required":
        plan.forced = True
        calls = [{"type": "object", "properties": {"name": {"const": n}, "arguments": s or {"type": "object"}},
                  "required": ["name", "arguments"], "additionalProperties": False} for n, s in schemas.items()]
        plan.grammar = GrammarSpec("json_schema", json.dumps({"anyOf": calls} if len(calls) > 1 else calls[0]))
    return plan


def _call(plan: ToolPlan, name: str, arguments: object, index: int = 0) -> dict:
    return {"id": f"{plan.call_id}_{index}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}


def tool_calls_of(plan: ToolPlan, text: str, index: int = 0) -> list[dict] | None:
    """The calls a finished output makes, or None when it is plain content."""
    if not plan.tools:
        return None
    if plan.named is not None:
        args = _loads(text)  # None: cut short (max_tokens) before the arguments were complete
        return [_call(plan, plan.named, args, index)] if isinstance(args, dict) else None
    match = _HERMES.match(text)
    found = _loads(match["body"] if match else text)
    if isinstance(found, dict) and found.get("name") in plan.tools:
        args = found.get("arguments", found.get("parameters", {}))
        return [_call(plan, found["name"], args, index)]
    return None


def _loads(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def tool_call_delta(plan: ToolPlan, index: int, so_far: str, piece: str, first: bool, finished: bool) -> dict | None:
    """The `tool_calls[0]` delta of a forced call's stream chunk (None: nothing to send yet).

    A named call streams its arguments as they are generated; a "required" call is sent whole
    when it is complete (its name is only known once the output parses).
    """
    if plan.named is not None:
        delta: dict = {"index": 0, "function": {"arguments": piece}}
        if first:
            delta.update(id=f"{plan.call_id}_{index}", type="function")
            delta["function"]["name"] = plan.named
        return delta
    if not finished:
        return None
    calls = tool_calls_of(plan, so_far, index)
    if not calls:
        return None
    call = calls[0]
    return {"index": 0, "id": call["id"], "type": "function", "function": dict(call["function"])}
