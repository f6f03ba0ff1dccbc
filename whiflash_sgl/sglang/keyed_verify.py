"""Keyed verification of sampled requests inside SGLang's EAGLE verify (``eagle_utils.eagle_sample``).

On CPU (and XPU, and HIP without rejection sampling) SGLang 0.5.23 verifies every batch greedily, sampled requests
included: ``target_predict = argmax(logits)`` over the verify rows, then ``verify_tree_greedy_func`` walks each
request's draft tree accepting a child iff its token equals the prediction at its parent's row. That is not lossless
at T > 0. WHIFLASH keeps the walk and changes only what it compares against: for a sampled request, the prediction at
a row is the target's **keyed sample** there (``whiflash_sgl.sampling.KeyedSampler``: a Gumbel-max draw keyed by
(seed, position) with SGLang's murmur3, bit-for-bit the draw SGLang's own sampler makes with
``--enable-deterministic-inference``). A draft token is then accepted iff it is the token the non-speculative server
would have sampled at that position, and the bonus token is that sample too, so the seeded text is the
non-speculative server's, whatever was drafted and whichever drafter the router picked.

The logits are SGLang's, after it applied penalties, logit bias and the grammar mask in place (``eagle_sample`` does
so before the argmax); the rows of request ``i`` are ``i * N .. i * N + N - 1`` (``N = draft_token_num``), each at
``verify_input.positions[row]``, which keys its draw as SGLang keys a decode row (the row at position ``p`` samples
the token at ``p + 1``). Greedy requests (SGLang normalises T = 0 to top_k = 1) keep SGLang's argmax.

:func:`keyed_verify` scopes the change to one ``run_eagle_verify`` call: SGLang's functions are swapped back when it
returns or raises, and nothing is swapped for an all-greedy batch. Where SGLang takes its own sampling branch
(``tree_speculative_sampling_target_only`` on CUDA) the greedy walk is not reached and SGLang's sampled
verification stands.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Sequence

import torch

from whiflash_sgl.sampling import KeyedSampler, SamplingParams

log = logging.getLogger(__name__)

DEFAULT_SEED = 42  # SGLang's seed for a request without sampling_seed (sampling_batch_info.from_schedule_batch)
TOP_K_ALL = 1 << 30  # SGLang's "no top-k" (sampling_params.TOP_K_ALL; -1 in a request becomes this)


def request_sampler(sampling_params) -> KeyedSampler | None:
    """The keyed draw of one SGLang request (its normalised ``SamplingParams``), or None when SGLang's argmax stays:
    a greedy request (top_k 1, which is how SGLang stores T = 0), or one with min_p, which the keyed rule does not
    define (SGLang's own seeded sampler refuses min_p too)."""
    top_k = int(sampling_params.top_k)
    if top_k <= 1 and top_k != -1:
        return None
    if float(getattr(sampling_params, "min_p", 0.0) or 0.0) > 0:
        return None
    seed = sampling_params.sampling_seed
    params = SamplingParams(temperature=float(sampling_params.temperature), top_p=float(sampling_params.top_p),
                            top_k=0 if top_k in (-1, TOP_K_ALL) else top_k)
    return KeyedSampler(params, DEFAULT_SEED if seed is None else int(seed))


def keyed_predictions(target_predict: torch.Tensor, logits: torch.Tensor, positions: torch.Tensor,
                      samplers: Sequence[KeyedSampler | None]) -> torch.Tensor:
    """``target_predict`` ``[bs, N]`` (the argmax SGLang computed) with each sampled request's rows replaced by its
    keyed sample at ``positions``; ``logits`` ``[bs * N, V]``, ``positions`` ``[bs * N]``."""
    bs, width = target_predict.shape
    if len(samplers) != bs:
        raise ValueError(f"{len(samplers)} requests for a verify batch of {bs}")
    predict = target_predict.clone()
    for i, sampler in enumerate(samplers):
        if sampler is None:
            continue
        rows = slice(i * width, (i + 1) * width)
        tokens = sampler.sample(logits[rows], positions[rows])
        predict[i] = torch.tensor(tokens, dtype=predict.dtype, device=predict.device)
    return predict


@contextlib.contextmanager
def keyed_verify(reqs):
    """Within the block, SGLang's EAGLE verify compares drafts against the keyed samples of the sampled ones among
    ``reqs`` (the batch's requests, in batch order) instead of the target's argmax."""
    samplers = [request_sampler(r.sampling_params) for r in reqs]
    if all(s is None for s in samplers):
        yield
        return
    if any(s is None and r.sampling_params.top_k > 1 for s, r in zip(samplers, reqs)):
        log.warning("WHIFLASH verifies requests with min_p > 0 greedily (the keyed rule does not define min_p)")

    from sglang.srt.speculative import eagle_utils, eagle_worker_common

    eagle_sample = eagle_worker_common.eagle_sample

    def keyed_eagle_sample(verify_input, batch, logits_output, *args, **kwargs):
        verify_tree_greedy = eagle_utils.verify_tree_greedy_func

        def verify_tree_keyed(*, target_predict, **kw):
            target_predict = keyed_predictions(target_predict, logits_output.next_token_logits,
                                               verify_input.positions, samplers)
            return verify_tree_greedy(target_predict=target_predict, **kw)

        eagle_utils.verify_tree_greedy_func = verify_tree_keyed
        try:
            return eagle_sample(verify_input, batch, logits_output, *args, **kwargs)
        finally:
            eagle_utils.verify_tree_greedy_func = verify_tree_greedy

    eagle_worker_common.eagle_sample = keyed_eagle_sample
    try:
        yield
    finally:
        eagle_worker_common.eagle_sample = eagle_sample
