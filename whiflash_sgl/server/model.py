"""The served model: one target and one generation method of the reference engine, used by one thread at a time.

It owns tokenization (the same as the CLI: raw text is tokenized as SGLang does, chat messages go through the
model's own chat template), the per-request checks, the batching engine over its target and drafter, a request's
submission to that engine, and log-probabilities of given tokens, which SGLang's ``select`` needs and which come
from a real target forward, not from the generation loop.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from whiflash_sgl.chat import encode_chat
from whiflash_sgl.config import WhiFlashConfig, read_mapping
from whiflash_sgl.engine import GenerationResult, Request, SpeculativeEngine
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.methods import EngineMethod, make_method
from whiflash_sgl.sampling import RULES, SamplingParams
from whiflash_sgl.target import Target

# SGLang's --speculative-algorithm names -> the reference engine's methods ("" = no speculation)
ALGORITHMS = {"": "vanilla", "WHIFLASH": "whiflash", "EAGLE3": "eagle3", "DFLASH": "dflash", "NGRAM": "ngram"}
GREEDY_BELOW = 1e-5  # SGLang samples greedily below this temperature
# the smallest top_p taken: any nucleus this small keeps the most likely token alone already, and a float32 cannot
# hold much smaller ones (below about 1e-45 top_p reads as 0 and would keep no token at all)
MIN_TOP_P = 1e-6


def method_name(algorithm: str | None, policy: str) -> str:
    """The engine method for an SGLang algorithm name (case-insensitive, as SGLang reads it)."""
    key = (algorithm or "").upper()
    if key not in ALGORITHMS:
        raise WhiFlashError(f"unknown --speculative-algorithm {algorithm!r}; the reference engine serves "
                            f"{', '.join(a for a in ALGORITHMS if a)} or none")
    name = ALGORITHMS[key]
    return f"whiflash:{policy}" if name == "whiflash" else name


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    stop: tuple[str, ...] = ()


@dataclass
class TokenLogprobs:
    """Per position ``(logprob or None, token id, token text or None)``, and the top alternatives when asked."""

    tokens: list[tuple[float | None, int, str | None]] = field(default_factory=list)
    top: list[list[tuple[float, int, str | None]] | None] = field(default_factory=list)


def generation_params(max_new_tokens: int, temperature: float | None, top_p: float | None, top_k: int | None,
                      stop: str | Sequence[str] | None, seed: int | None) -> GenerationParams:
    """Both APIs' generation fields (``None``: not given) as engine parameters. Without a seed a request gets a fresh
    random one, so that unseeded sampled requests differ, as with OpenAI and vLLM."""
    stop = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    return GenerationParams(max_new_tokens, sampling_params(temperature, top_p, top_k),
                            secrets.randbits(64) if seed is None else seed, stop)


def sampling_params(temperature: float | None, top_p: float | None, top_k: int | None) -> SamplingParams:
    """SGLang's conventions (temperature 1 by default, greedy below 1e-5, top_k -1 = off) as engine parameters."""
    temperature = 1.0 if temperature is None else temperature
    if top_k is not None and top_k != -1 and top_k < 1:
        raise WhiFlashError(f"top_k must be -1 (off) or at least 1, got {top_k}")
    if top_p is not None and not MIN_TOP_P <= top_p <= 1:
        raise WhiFlashError(f"top_p must be in [{MIN_TOP_P:g}, 1], got {top_p:g} (a smaller top_p keeps only the most "
                            f"likely token, as {MIN_TOP_P:g} does already)")
    if 0 <= temperature < GREEDY_BELOW:
        temperature = 0.0
    try:
        return SamplingParams(temperature, 1.0 if top_p is None else top_p,
                              0 if top_k in (None, -1) else top_k)
    except ValueError as exc:
        raise WhiFlashError(str(exc)) from exc


class ServedModel:
    """A target with a generation method; not thread-safe: the scheduler's single engine thread drives it (tokenizing
    and checking requests, which read only, run on the service's preparing thread)."""

    def __init__(self, target: Target, method: EngineMethod, model_path: str, served_name: str | None = None,
                 algorithm: str = "", policy: str = "", sampling_rule: str = "keyed"):
        self.target, self.method, self.sampling_rule = target, method, sampling_rule
        self.model_path = model_path
        self.served_name = served_name or model_path
        self.algorithm, self.policy = algorithm.upper(), policy if algorithm.upper() == "WHIFLASH" else ""
        # a one-drafter method is credited with every round; routed methods record each round's paradigm
        self.single_paradigm = method.name if method.name in ("eagle3", "dflash", "ngram") else None

    @classmethod
    def load(cls, model_path: str, algorithm: str | None = None, policy: str = "heuristic",
             config_path: str | None = None, policy_config: str | None = None,
             served_name: str | None = None, sampling_rule: str = "keyed", matmul: str = "float32") -> "ServedModel":
        """Everything a server needs before it binds its port; any problem is a :class:`WhiFlashError`."""
        if sampling_rule not in RULES:
            raise WhiFlashError(f"--sampling-rule must be one of {', '.join(RULES)}, got {sampling_rule!r}")
        name = method_name(algorithm, policy)
        config = WhiFlashConfig.from_file(config_path) if config_path else WhiFlashConfig()
        params = read_mapping(policy_config) if policy_config else None
        target = Target.load(model_path, matmul=matmul)
        return cls(target, make_method(name, target, config, params), model_path, served_name, algorithm or "",
                   policy, sampling_rule)

    @property
    def speculative(self) -> bool:
        return self.method.drafter is not None

    @property
    def context_length(self) -> int:
        return self.target.context_length

    @property
    def vocab_size(self) -> int:
        return self.target.model.get_input_embeddings().num_embeddings

    def encode_text(self, text: str) -> list[int]:
        """Tokenized as SGLang tokenizes ``text`` (the tokenizer's default special tokens, e.g. a BOS, included)."""
        return list(self.target.tokenizer(text)["input_ids"])

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """The model's chat template with the assistant turn opened: exactly what ``whiflash generate`` feeds."""
        return encode_chat(self.target.tokenizer, messages)

    def decode(self, ids: Sequence[int]) -> str:
        return self.target.tokenizer.decode(list(ids), skip_special_tokens=True)

    def check(self, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
        """The request's limits, checked before it is queued: token ids in range, prompt within the context."""
        if not prompt_ids:
            raise WhiFlashError("the prompt is empty: give at least one token")
        vocab = self.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise WhiFlashError(f"input_ids has ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        if len(prompt_ids) + max_new_tokens > self.context_length:
            raise WhiFlashError(
                f"the prompt has {len(prompt_ids)} tokens and max_new_tokens is {max_new_tokens}: together they "
                f"exceed the model's context window of {self.context_length} tokens; shorten the prompt or lower "
                f"max_new_tokens")
        if max_new_tokens > 0:  # a request whose worst case the KV pool can never hold (the engine's own check)
            SpeculativeEngine(self.target).check_request(prompt_ids, max_new_tokens)

    def engine(self, max_running: int) -> SpeculativeEngine:
        """The batching engine of the server: this target and this method's drafter (forked per request)."""
        return SpeculativeEngine(self.target, self.method.drafter, max_running=max_running)

    def submit(self, engine: SpeculativeEngine, prompt_ids: Sequence[int], params: GenerationParams,
               on_text: Callable[[str], None] | None = None) -> Request | None:
        """Queue a request on ``engine`` with its own sampling (under the server's rule), seed and stop strings;
        None for a request for no new tokens (SGLang's way to tokenize or prefill only), which needs no engine."""
        if params.max_new_tokens == 0:
            return None
        sampling = replace(params.sampling, rule=self.sampling_rule)
        return engine.submit(list(prompt_ids), params.max_new_tokens, sampling=sampling, seed=params.seed,
                             stop=params.stop, on_text=on_text)

    def round_paradigms(self, request: Request) -> list[str]:
        """The paradigm that drafted each of ``request``'s drafted rounds so far: a one-drafter method's name for
        every round, a routed request's own choice of each round."""
        if self.single_paradigm:
            return [self.single_paradigm] * len(request.accept_lengths)
        return request.drafter.summary().get("paradigms", []) if request.drafter is not None else []

    def generate(self, prompt_ids: Sequence[int], params: GenerationParams,
                 on_text: Callable[[str], None] | None = None,
                 cancelled: Callable[[], bool] | None = None) -> GenerationResult:
        if params.max_new_tokens == 0:  # SGLang's way to tokenize/prefill only
            return self.prompt_only(len(prompt_ids))
        sampling = replace(params.sampling, rule=self.sampling_rule)
        return self.method.generate(list(prompt_ids), params.max_new_tokens, sampling, params.seed,
                                    stop=params.stop, on_text=on_text, cancelled=cancelled)

    @staticmethod
    def prompt_only(prompt_tokens: int) -> GenerationResult:
        """The result of a request for no new tokens."""
        return GenerationResult(prompt_tokens=prompt_tokens, tokens=[], text="", finish_reason="length",
                                seconds=0.0, rounds=0, drafted=0)

    def logprobs(self, ids: Sequence[int], first: int, top_n: int, with_text: bool,
                 cancelled: Callable[[], bool] | None = None) -> TokenLogprobs:
        """``log p(ids[i] | ids[:i])`` for ``i`` in ``[first, len(ids))`` (``first >= 1``) from one target forward,
        without temperature; with the ``top_n`` most likely tokens at each of those positions when ``top_n > 0``.
        ``cancelled`` is asked before each position; when it says so, the positions so far are returned."""
        ids = list(ids)
        out = TokenLogprobs()
        if first >= len(ids):
            return out
        text = self._token_text if with_text else (lambda _: None)
        logits = self.target.score(ids, len(ids) - first + 1)  # row j predicts ids[first + j]
        for row, token in zip(logits, ids[first:]):
            if cancelled is not None and cancelled():
                break
            logp = torch.log_softmax(row.float(), dim=-1)
            out.tokens.append((_finite(logp[token]), token, text(token)))
            if top_n > 0:
                values, indices = torch.topk(logp, min(top_n, logp.numel()))
                out.top.append([(_finite(v), int(i), text(int(i))) for v, i in zip(values, indices)])
        return out

    def _token_text(self, token: int) -> str:
        return self.target.tokenizer.decode([token])

    def describe(self) -> dict:
        config = self.target.config
        return {
            "model_path": self.model_path,
            "served_model_name": self.served_name,
            "tokenizer_path": self.model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": getattr(config, "model_type", None),
            "architectures": getattr(config, "architectures", None),
            "context_length": self.context_length,
        }


def _finite(value: torch.Tensor) -> float:
    """A log-probability for JSON, which has no -inf: the smallest float stands in for an impossible token."""
    x = float(value)
    return x if math.isfinite(x) else -3.4e38

