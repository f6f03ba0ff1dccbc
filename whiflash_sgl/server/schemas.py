"""Request bodies of the HTTP API, validated strictly.

Unknown fields and wrong types are refused, never coerced. Fields that SGLang or OpenAI define but the reference
engine cannot honour (structured output, penalties, ``n > 1``, images, ...) are accepted only at their neutral value
(``null`` or the documented default), because SGLang's own frontend sends several of them on every request; any other
value is refused with a message saying the reference engine does not support it, rather than silently ignored.
Values that JSON can carry but no field can take (lone surrogates, NaN, integers too long to convert, deep nesting)
are refused before validation, with the field's path.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from whiflash_sgl.sampling import SEED_RANGE
from whiflash_sgl.server.http import HttpError

NATIVE_DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's SamplingParams default
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's /v1/completions default
# top logprobs per position, native top_logprobs_num: OpenAI's cap on top_logprobs; each one costs a decode per
# position, and SGLang's frontend asks for a handful at most
MAX_TOP_LOGPROBS = 20
MAX_JSON_DEPTH = 32  # the schemas need 4 levels; deeper input is refused before any recursive code sees it


class BadRequest(HttpError):
    """The request is malformed or asks for something the server cannot do: an HTTP 400 with this message."""


def _seed(value: int) -> int:
    if not SEED_RANGE[0] <= value < SEED_RANGE[1]:
        shown = str(value) if abs(value) < 10**40 else f"an integer of {len(str(abs(value)))} digits"
        raise PydanticCustomError("seed", "must be an integer in [-2**63, 2**64) (a negative seed is taken modulo "
                                          "2**64), got {shown}", {"shown": shown})
    return value


Seed = Annotated[int, AfterValidator(_seed)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]
LogprobStart = Annotated[int, Field(ge=-1)]  # -1: output logprobs only; else a prompt position (checked later)


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
        data = json.loads(body, parse_int=_int)
    except RecursionError:
        raise BadRequest(f"malformed JSON body: nested far deeper than the {MAX_JSON_DEPTH} levels allowed") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON body: {exc}") from exc
    _check_values(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(describe(exc)) from exc


class _LongInt:
    """An integer literal longer than Python converts (``sys.get_int_max_str_digits``), kept for the error."""

    def __init__(self, literal: str):
        self.digits = len(literal.lstrip("-"))


def _int(literal: str) -> int | _LongInt:
    try:
        return int(literal)
    except ValueError:
        return _LongInt(literal)


def _check_values(data) -> None:
    """Refuse what no field takes, naming where it is: nesting deeper than ``MAX_JSON_DEPTH``, lone surrogates
    (which can neither be tokenized nor sent back), NaN and infinities, integers too long to convert. Iterative, so
    depth costs no stack; ints, the bulk of ``input_ids``, are passed over first."""
    stack = [((), data)] if isinstance(data, (dict, list)) else []
    while stack:
        path, container = stack.pop()
        if len(path) >= MAX_JSON_DEPTH:
            raise _bad(path[:3], f"nested deeper than {MAX_JSON_DEPTH} levels")
        for key, value in container.items() if isinstance(container, dict) else enumerate(container):
            if type(key) is str and (problem := _value_problem(key)):
                raise _bad(path, f"a field name {problem}")
            if type(value) is int:
                continue
            if isinstance(value, (dict, list)):
                stack.append((path + (key,), value))
            elif problem := _value_problem(value):
                raise _bad(path + (key,), problem)


def _value_problem(value) -> str | None:
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "is not valid Unicode: it holds a lone surrogate (a \\ud800-\\udfff escape without its pair)"
    elif isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number (NaN and infinities are not)"
    elif isinstance(value, _LongInt):
        return f"is an integer of {value.digits} digits, out of range for every field"
    return None


def _bad(path: tuple, problem: str) -> BadRequest:
    return BadRequest(f"invalid request: {'.'.join(map(str, path)) or 'the body'}: {problem}")


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and ("[" in part or part in _TYPE_TAGS or part.startswith("constrained-"))


def describe(exc: ValidationError) -> str:
    """One line for a validation error. Pydantic reports a union's failure once per member, with the member's type
    in the location (``text.str``, ``text.list[str]``): those tags are dropped, and per location the first message
    is kept, preferring one that is not a plain type mismatch (``text: []`` is a list too short, more than it is not
    a string); a location is dropped when a more specific one inside it failed too."""
    by_location: dict[tuple, tuple[bool, str]] = {}
    for error in exc.errors(include_url=False):
        loc = tuple(str(p) for p in error["loc"] if not _is_type_tag(p))
        if error["type"] == "extra_forbidden":
            message = f"unknown field {'.'.join(loc)!r}"
        else:
            message = f"{'.'.join(loc)}: {error['msg']}" if loc else error["msg"]
        mismatch = error["type"].endswith("_type")
        if loc not in by_location or by_location[loc][0] and not mismatch:
            by_location[loc] = (mismatch, message)
    kept = [message for loc, (_, message) in by_location.items()
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
    sampling_seed: Seed | None = None
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

    text: str | Annotated[list[str], Field(min_length=1)] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: SamplingParamsBody | list[SamplingParamsBody] | None = None
    rid: str | list[str] | None = None
    stream: bool = False
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: LogprobStart | list[LogprobStart] | None = None
    top_logprobs_num: TopLogprobs | list[TopLogprobs] | None = None
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
    seed: Seed | None = None
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
