"""The OpenAI request fields beyond plain sampling: structured outputs, stream options,
tools, and the SDK parameters this server refuses by name rather than ignore.

Every parameter of the official SDK's `completions.create` / `chat.completions.create` is
either honoured or refused with a 400 naming it (tests/server/test_openai_fields.py walks
the SDK's signatures). A few are metadata with nothing to honour in a self-hosted server
(`user`, `safety_identifier`, `prompt_cache_key`, `prompt_cache_options`,
`prompt_cache_retention`, `service_tier`, `metadata`): accepted, documented as such in docs/api.md.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from lorafold.server.engine.sampling_params import GrammarSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JSONSchemaFormat(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    schema_: Annotated[dict[str, Any], Field(alias="schema")] = Field(default_factory=dict)
    strict: StrictBool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object with a schema")
        return self


class StreamOptions(_Strict):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False

    @model_validator(mode="after")
    def _no_continuous(self) -> StreamOptions:
        if self.continuous_usage_stats:
            raise ValueError("stream_options.continuous_usage_stats is not supported; use include_usage")
        return self


class FunctionDef(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: StrictBool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(_Strict):
    class _Name(_Strict):
        name: str

    type: Literal["function"]
    function: _Name


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice

# SDK parameters with no meaning here: refused when set to anything but their neutral value.
# name -> (neutral values, why)
UNSUPPORTED: dict[str, tuple[tuple[object, ...], str]] = {
    "audio": ((None,), "audio output is not supported: this server serves text models"),
    "modalities": ((None, ["text"]), "only the text modality is supported"),
    "functions": ((None,), "`functions` is deprecated by OpenAI and not supported: send `tools`"),
    "function_call": ((None,), "`function_call` is deprecated by OpenAI and not supported: send `tool_choice`"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "reasoning_effort": ((None,), "reasoning_effort applies to reasoning models; this server has none"),
    "verbosity": ((None,), "verbosity applies to reasoning models; this server has none"),
    "web_search_options": ((None,), "web search is not supported"),
    "suffix": ((None, ""), "suffix (insertion) is not supported"),
    "store": ((None, False), "stored completions are not supported; drop store or set it false"),
    "parallel_tool_calls": ((None, True, False), ""),
    "moderation": ((None,), "moderation is not part of this server; run it before or after the request"),
}


def refuse_unsupported(data: object) -> object:
    """A `mode="before"` validator body: a 400 naming the first unsupported field that is set."""
    if isinstance(data, dict):
        for name, (neutral, why) in UNSUPPORTED.items():
            if name in data and data[name] not in neutral:
                raise ValueError(f"{name}: {why}")
    return data


def grammar_spec(
    response_format: ResponseFormat | None,
    guided_json: dict | str | None,
    guided_regex: str | None,
    guided_choice: list[str] | None,
    guided_grammar: str | None,
) -> GrammarSpec | None:
    """The request's structured-output constraint (at most one may be given)."""
    specs: list[tuple[str, GrammarSpec]] = []
    if response_format is not None and response_format.type == "json_object":
        specs.append(("response_format", GrammarSpec("json_object")))
    elif response_format is not None and response_format.type == "json_schema":
        schema = response_format.json_schema.schema_ or {"type": "object"}
        specs.append(("response_format", GrammarSpec("json_schema", json.dumps(schema))))
    if guided_json is not None:
        text = guided_json if isinstance(guided_json, str) else json.dumps(guided_json)
        specs.append(("guided_json", GrammarSpec("json_schema", text)))
    if guided_regex is not None:
        specs.append(("guided_regex", GrammarSpec("regex", guided_regex)))
    if guided_choice is not None:
        specs.append(("guided_choice", GrammarSpec("choice", json.dumps(guided_choice))))
    if guided_grammar is not None:
        specs.append(("guided_grammar", GrammarSpec("grammar", guided_grammar)))
    if len(specs) > 1:
        raise ValueError(f"give at most one structured-output constraint, got {', '.join(n for n, _ in specs)}")
    return specs[0][1] if specs else None
