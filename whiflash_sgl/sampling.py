"""What a sampled token is: the filtered distribution, and the keyed draw that makes one seed mean one text.

**Filtering** follows SGLang's sampler, so that our engine, SGLang's server and WHIFLASH inside SGLang sample from
the same distribution: ``softmax(logits / T)`` in float32; the tokens sorted by probability; a token is dropped when
its rank is ``>= top_k`` or when the probability mass strictly before it exceeds ``top_p`` (mass of the unfiltered
distribution); the rest keep their probabilities, renormalised.

**Keyed draw** (the default rule): the token at sequence index ``i + 1`` is the Gumbel-max sample
``argmax_c(log p~_c + g(seed, i, c))`` over the filtered distribution ``p~`` computed from the logits at position
``i``, with ``g = -log(-log(u))`` and ``u = murmur3(seed, i, c) / (2**32 - 1)``. The column ``c`` is the token id
when nothing is filtered and the token's rank otherwise, exactly as SGLang 0.5.23's seeded sampler
(``multinomial_with_seed``) keys it. Because the noise depends on (seed, position) only, the text of vanilla decoding
is a pure function of (prompt, parameters, seed), and a speculative decoder reproduces it token for token by
accepting a draft token iff it equals the target's keyed sample at that position (``verify.accept_keyed``).
Drafters that draw with the same noise on their own logits (:meth:`KeyedSampler.guesses`) guess that sample well.

The other rule, ``rejection``, is classic speculative sampling with a per-request random stream: the same
distribution, but the text depends on what was drafted.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.rowwise import argmax_rows

SEED_RANGE = (-(2**63), 2**64)  # accepted seeds; negative ones are taken modulo 2**64, as SGLang's uint64 cast does
RULES = ("keyed", "rejection")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    rule: str = "keyed"  # how T > 0 draws its randomness; see the module docstring

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.rule not in RULES:
            raise ValueError(f"sampling rule must be one of {', '.join(RULES)}, got {self.rule!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filtered(self) -> bool:
        """Whether top-k or top-p removes tokens (then the noise is keyed by rank, not by token id)."""
        return self.top_k > 0 or self.top_p < 1


def check_seed(seed: int) -> int:
    """``seed`` as the unsigned 64-bit key; a clear error outside :data:`SEED_RANGE`."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise WhiFlashError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
    return seed % 2**64


def ranked_logprobs(logits: torch.Tensor, params: SamplingParams,
                    cut: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float64 log-probabilities of the filtered distribution (unnormalised; ``-inf`` where dropped) by noise column,
    and the token id of each column (``None``: the column is the token id). Filtered rows are cut to the longest
    kept prefix of ranks, which is all the noise the draw needs; ``cut=False`` keeps every rank unfiltered (the
    columns still keyed by rank)."""
    temperature = torch.full((logits.shape[0], 1), params.temperature, dtype=torch.float32, device=logits.device)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if not params.filtered:
        return torch.log(probs).double(), None
    probs, order = probs.sort(dim=-1, descending=True)
    if not cut:
        return probs.double().log(), order
    before = probs.cumsum(dim=-1) - probs
    ranks = torch.arange(probs.shape[-1], device=probs.device)
    if params.top_k:
        probs[:, ranks >= params.top_k] = 0.0
    probs[before > torch.tensor(params.top_p, dtype=torch.float32)] = 0.0
    kept = int((probs > 0).sum(-1).max())
    return probs[:, :kept].double().log(), order[:, :kept]


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The filtered distribution over token ids ``[R, V]``, normalised (what the rejection rule samples from)."""
    logp, order = ranked_logprobs(logits, params)
    probs = logp.exp().float()
    if order is not None:
        probs = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device).scatter_(-1, order, probs)
    return probs / probs.sum(-1, keepdim=True)


# ---- murmur3 over (seed low, seed high, position, column), as SGLang's murmur_hash32 ----------------------------
_C1, _C2, _N = np.uint32(0xCC9E2D51), np.uint32(0x1B873593), np.uint32(0xE6546B64)


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _scramble(k: np.ndarray) -> np.ndarray:
    return _rotl(k * _C1, 15) * _C2


def _fold(h: np.ndarray, scrambled: np.ndarray) -> np.ndarray:
    return _rotl(h ^ scrambled, 13) * np.uint32(5) + _N


@functools.lru_cache(maxsize=4)
def _scrambled_columns(count: int) -> np.ndarray:
    """The column blocks, scrambled once per width (they are the same for every seed and position)."""
    return _scramble(np.arange(count, dtype=np.uint32))


def murmur3(seed: int, positions: np.ndarray, count: int) -> np.ndarray:
    """uint32 ``[len(positions), count]``: the hash of (``seed`` as two 32-bit halves, position, column)."""
    with np.errstate(over="ignore"):
        h = np.zeros(1, dtype=np.uint32)
        h = _fold(h, _scramble(np.array([seed & 0xFFFFFFFF], dtype=np.uint32)))
        h = _fold(h, _scramble(np.array([seed >> 32], dtype=np.uint32)))
        h = _fold(h, _scramble(np.asarray(positions, dtype=np.int64).astype(np.uint32)))
        h = _fold(h[:, None], _scrambled_columns(count)[None, :]) ^ np.uint32(16)
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        return h ^ (h >> np.uint32(16))


def gumbel_noise(seed: int, positions, count: int) -> torch.Tensor:
    """float64 ``[len(positions), count]`` Gumbel noise, with SGLang's clamps (a hash of 0 or 2**32-1 stays finite)."""
    u = torch.from_numpy(murmur3(seed, np.asarray(positions), count).astype(np.float64)) / 4294967295.0
    return -torch.log(-torch.log(u).clamp(min=torch.finfo(torch.float64).min, max=-(2.0**-32)))


class KeyedSampler:
    """The keyed draw of one request: its parameters and 64-bit seed."""

    def __init__(self, params: SamplingParams, seed: int):
        if params.greedy:
            raise ValueError("a keyed sampler needs temperature > 0")
        self.params, self.seed = params, check_seed(seed)

    def _draw(self, logits: torch.Tensor, positions, cut: bool) -> torch.Tensor:
        """Token ids ``[R]`` (on the CPU): the Gumbel-max of each row, row ``r`` keyed at ``positions[r]``."""
        logp, order = ranked_logprobs(logits, self.params, cut)
        positions = torch.as_tensor(positions).reshape(-1).cpu().numpy()
        best = argmax_rows(logp.cpu() + gumbel_noise(self.seed, positions, logp.shape[-1]))[:, None]
        return (best if order is None else order.cpu().gather(-1, best)).view(-1)

    def sample(self, logits: torch.Tensor, positions) -> list[int]:
        """The token drawn from each row of ``logits`` ``[R, V]``, row ``r`` sitting at ``positions[r]``."""
        return self._draw(logits, positions, cut=True).tolist()

    def guesses(self, logits: torch.Tensor, positions) -> torch.Tensor:
        """A drafter's guess of the target's keyed draw at each row: the same draw on the drafter's own logits, its
        distribution uncut (top-k/top-p of a draft distribution, often sharper than the target's, would cut tokens
        the target keeps). Token ids ``[R]`` on the logits' device."""
        return self._draw(logits, positions, cut=False).to(logits.device)


def lead_with(logp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Draft log-probs ``[R, C]`` with column ``index[r]`` of each row raised just above the row's best: a drafter's
    keyed guess leads its candidates and its own ranking fills the rest. Ranking every candidate by the perturbed
    scores instead loses tau (measured: a small drafter is flatter than the target, and the noise then reorders
    its runners-up away from the target's likely tokens)."""
    rows = torch.arange(logp.shape[0], device=logp.device)
    logp = logp.clone()
    logp[rows, index] = logp.amax(dim=-1) + 1e-4
    return logp
