"""Request bodies of the HTTP API, validated strictly.

Unknown fields and wrong types are refused, never coerced. Fields that SGLang or OpenAI define but the reference
engine cannot honour (structured output, penalties, ``n > 1``, images, ...) are accepted only at their neutral value
(``null`` or the documented default), because SGLang's own frontend sends several of them on every request; any other
value is refused with a message saying the reference engine does not support it, rather than silently ignored.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from whiflash_sgl.errors import WhiFlashError

NATIVE_DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's SamplingParams default
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's /v1/completions default


class BadRequest(WhiFlashError):
    """The request is malformed or asks for something the server cannot do: an HTTP 400 with this message."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    # field name -> the values the reference engine can honour (everything else is refused)
    NEUTRAL: ClassVar[dict[str, tuple]] = {}

    @model_validator(mode="after")
    def _only_neutral_values(self):
        for name, neutral in self.NEUTRAL.items():
            value = getattr(self, name)
            if not any(value == n and type(value) is type(n) or value is n for n in neutral):
                shown = ", ".join("null" if n is None else json.dumps(n) for n in neutral)
                raise PydanticCustomError(
                    "unsupported", "{name}={value} is not supported by the reference engine (only {shown})",
                    {"name": name, "value": json.dumps(value), "shown": shown},
                )
        return self


def parse(model: type[_Body], body: bytes):
    """``body`` (raw JSON) validated as ``model``; a :class:`BadRequest` naming every problem otherwise."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON body: {exc}") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(describe(exc)) from exc


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def describe(exc: ValidationError) -> str:
    """One line for a validation error. Pydantic reports a union's failure once per member, with the member's type
    in the location (``text.str``, ``text.list[str]``): those tags are dropped, the first message per location is
    kept, and a location is dropped when a more specific one inside it failed too."""
    by_location: dict[tuple, str] = {}
    for error in exc.errors(include_url=False):
        loc = tuple(str(p) for p in error["loc"] if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS)))
        if error["type"] == "extra_forbidden":
            message = f"unknown field {'.'.join(loc)!r}"
        else:
            message = f"{'.'.join(loc)}: {error['msg']}" if loc else error["msg"]
        by_location.setdefault(loc, message)
    kept = [message for loc, message in by_location.items()
            if not any(other != loc and other[:len(loc)] == loc for other in by_location)]
    return "invalid request: " + "; ".join(kept[:6])


# --- SGLang native ----------------------------------------------------------------------------------------------


class SamplingParamsBody(_Body):
    """SGLang's ``sampling_params``; ``null`` means the default, as in SGLang."""

    max_new_tokens: int | None = Field(None, ge=0)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: str | list[str] | None = None
    sampling_seed: int | None = None
    spaces_between_special_tokens: bool | None = None  # no effect: special tokens are always skipped
    min_p: float | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    min_new_tokens: int | None = None
    n: int | None = None
    beam_width: int | None = None
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    stream_interval: int | None = None
    logit_bias: dict[str, float] | None = None
    custom_params: dict[str, Any] | None = None
    watermark: dict[str, Any] | None = None

    NEUTRAL = {
        "min_p": (None, 0.0), "stop_token_ids": (None, []), "stop_regex": (None, [], ""),
        "frequency_penalty": (None, 0.0), "presence_penalty": (None, 0.0), "repetition_penalty": (None, 1.0),
        "min_new_tokens": (None, 0), "n": (None, 1), "beam_width": (None, 1), "json_schema": (None,),
        "regex": (None,), "ebnf": (None,), "structural_tag": (None,), "ignore_eos": (None, False),
        "skip_special_tokens": (None, True), "no_stop_trim": (None, False), "stream_interval": (None,),
        "logit_bias": (None, {}), "custom_params": (None,), "watermark": (None,),
    }


class GenerateBody(_Body):
    """SGLang's ``/generate``: one prompt, or a batch when ``text``/``input_ids`` is a list of prompts."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: SamplingParamsBody | list[SamplingParamsBody] | None = None
    rid: str | list[str] | None = None
    stream: bool = False
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    return_text_in_logprobs: bool = False
    log_metrics: bool = True
    image_data: Any = None
    video_data: Any = None
    audio_data: Any = None
    input_embeds: Any = None
    lora_path: Any = None
    session_params: Any = None
    custom_logit_processor: Any = None
    token_ids_logprob: Any = None
    return_hidden_states: Any = None

    NEUTRAL = {name: (None,) for name in ("image_data", "video_data", "audio_data", "input_embeds", "lora_path",
                                          "session_params", "custom_logit_processor", "token_ids_logprob")}
    NEUTRAL["return_hidden_states"] = (None, False)

    @model_validator(mode="after")
    def _one_prompt_source(self):
        if (self.text is None) == (self.input_ids is None):
            raise PydanticCustomError("prompt", "give exactly one of text and input_ids")
        if self.stream and self.batch_size is not None:
            raise PydanticCustomError("stream", "stream=true takes one prompt, not a batch")
        per_item = {"sampling_params": self.sampling_params, "rid": self.rid, "return_logprob": self.return_logprob,
                    "logprob_start_len": self.logprob_start_len, "top_logprobs_num": self.top_logprobs_num}
        for name, value in per_item.items():
            if isinstance(value, list) and len(value) != (self.batch_size or 1):
                raise PydanticCustomError("batch", "{name} has {got} entries for {want} prompt(s)",
                                          {"name": name, "got": len(value), "want": self.batch_size or 1})
        return self

    @property
    def batch_size(self) -> int | None:
        """The number of prompts of a batch request, ``None`` for a single prompt."""
        if isinstance(self.text, list):
            return len(self.text)
        if self.input_ids and isinstance(self.input_ids[0], list):
            return len(self.input_ids)
        return None

    def prompts(self) -> list[str | list[int]]:
        source = self.text if self.text is not None else self.input_ids
        return list(source) if self.batch_size is not None else [source]

    def item(self, name: str, index: int):
        """Field ``name`` for prompt ``index`` (a per-prompt list, or one value for all)."""
        value = getattr(self, name)
        return value[index] if isinstance(value, list) else value


# --- OpenAI -------------------------------------------------------------------------------------------------------


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False

    NEUTRAL = {"continuous_usage_stats": (False,)}


class _OpenAIBody(_Body):
    """Fields both OpenAI endpoints share (``top_k``, ``min_p``, ... are SGLang's extensions)."""

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None  # an end-user id for the caller's own bookkeeping; it does not change the output
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_p: float | None = None
    ignore_eos: bool | None = None
    regex: str | None = None
    json_schema: str | None = None

    NEUTRAL = {
        "n": (None, 1), "frequency_penalty": (None, 0.0), "presence_penalty": (None, 0.0),
        "repetition_penalty": (None, 1.0), "logit_bias": (None, {}), "min_p": (None, 0.0),
        "ignore_eos": (None, False), "regex": (None,), "json_schema": (None,),
    }


class CompletionBody(_OpenAIBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    NEUTRAL = {**_OpenAIBody.NEUTRAL, "echo": (False,), "suffix": (None,), "best_of": (None, 1), "logprobs": (None,)}

    @model_validator(mode="after")
    def _one_stream(self):
        if self.stream and isinstance(self.prompt, list) and self.prompt and not isinstance(self.prompt[0], int):
            raise PydanticCustomError("stream", "stream=true takes one prompt, not a list of prompts")
        return self

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, list) and self.prompt and not isinstance(self.prompt[0], int):
            return list(self.prompt)
        return [self.prompt]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    NEUTRAL = {"name": (None,)}

    def as_template_message(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionBody(_OpenAIBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    NEUTRAL = {**_OpenAIBody.NEUTRAL, "logprobs": (None, False), "top_logprobs": (None,), "tools": (None, []),
               "tool_choice": (None, "none"), "parallel_tool_calls": (None,),
               "response_format": (None, {"type": "text"})}

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
