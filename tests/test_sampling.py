"""The keyed draw: SGLang's hash, the right distribution, all 64 bits of the seed, and bad seeds refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.sampling import KeyedSampler, SamplingParams, check_seed, murmur3, target_probs

LOGITS = torch.tensor([[2.0, 1.2, 0.9, 0.3, 0.0, -0.4, -1.0, -2.5]])


def _expected(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The filtered distribution written out plainly: rank tokens, keep the top_k best and those whose preceding
    mass (of the unfiltered distribution) is at most top_p, renormalise."""
    p = np.exp(logits[0].double().numpy() / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros_like(p, dtype=bool)
    before = 0.0
    for rank, token in enumerate(order):
        keep[token] = (top_k == 0 or rank < top_k) and before <= top_p
        before += p[token]
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def _draws(params: SamplingParams, n: int, seed: int = 11) -> np.ndarray:
    """``n`` keyed draws from the same logits at ``n`` positions (independent keys)."""
    tokens = KeyedSampler(params, seed).sample(LOGITS.expand(n, -1), torch.arange(n))
    return np.bincount(tokens, minlength=LOGITS.shape[-1])


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 4, 1.0),
                                                      (0.8, 0, 0.9), (1.0, 5, 0.8)])
def test_keyed_draws_follow_the_filtered_distribution(temperature, top_k, top_p):
    """Chi-square goodness of fit at significance 0.001 over 30k draws, against the distribution computed above;
    the same counts must reject the distribution of a 25% wrong temperature, which shows the test has the power to
    catch a wrong rule."""
    n = 30_000
    observed = _draws(SamplingParams(temperature, top_p, top_k), n)
    expected = _expected(LOGITS, temperature, top_k, top_p)
    support = expected > 0
    assert observed[~support].sum() == 0  # nothing filtered out is ever drawn
    assert chisquare(observed[support], expected[support] * n).pvalue > 1e-3
    wrong = _expected(LOGITS, temperature * 1.25, top_k, top_p)[support]
    assert chisquare(observed[support], wrong / wrong.sum() * n).pvalue < 1e-6


def test_rejection_rule_distribution_is_the_keyed_one():
    """Both rules sample from one definition of the filtered distribution."""
    for params in (SamplingParams(0.8, 0.9), SamplingParams(1.0, 0.8, 5), SamplingParams(0.7)):
        expected = _expected(LOGITS, params.temperature, params.top_k, params.top_p)
        np.testing.assert_allclose(target_probs(LOGITS, params)[0].double().numpy(), expected, atol=1e-6)


def test_the_draw_is_a_function_of_seed_and_position():
    params = SamplingParams(1.0)
    sampler = KeyedSampler(params, 42)
    logits = LOGITS.expand(64, -1)
    positions = torch.arange(100, 164)
    first = sampler.sample(logits, positions)
    assert first == KeyedSampler(params, 42).sample(logits, positions)
    # a row's token depends on its own position, not on the rows sampled with it
    assert [sampler.sample(logits[:1], positions[i : i + 1])[0] for i in range(0, 64, 9)] == first[::9]
    assert first != sampler.sample(logits, positions + 1)
    # a drafter's guess on the same logits is the draw itself when nothing is filtered
    assert sampler.guesses(logits, positions).tolist() == first


def test_seeds_use_all_64_bits_and_bad_seeds_are_refused():
    params = SamplingParams(1.0)
    logits, positions = LOGITS.expand(64, -1), torch.arange(64)
    low = KeyedSampler(params, 7).sample(logits, positions)
    assert KeyedSampler(params, 7 + 2**40).sample(logits, positions) != low
    assert KeyedSampler(params, 7 + 2**63).sample(logits, positions) != low
    assert KeyedSampler(params, -1).sample(logits, positions) == KeyedSampler(params, 2**64 - 1).sample(
        logits, positions)  # negative seeds are taken modulo 2**64, as SGLang's uint64 cast does
    for bad in (2**64, -(2**63) - 1, 1.5, "7", True):
        with pytest.raises(WhiFlashError, match="seed must be an integer"):
            check_seed(bad)


def test_hash_is_sglangs_murmur3():
    """Against the sgl_kernel stand-in's op, itself checked against SGLang's Triton kernel (test_sgl_kernel_cpu)."""
    pytest.importorskip("sgl_kernel", reason="the sgl_kernel stand-in is not installed")
    positions = np.array([0, 5, 2**31, 2**33 + 7])
    for seed in (0, 1234, 2**40 + 3, 2**63 + 5, 2**64 - 1):
        expected = torch.ops.sgl_kernel.murmur_hash32_cpu(
            torch.tensor([seed] * 4, dtype=torch.uint64), torch.tensor(positions), torch.arange(300))
        assert np.array_equal(murmur3(seed, positions, 300), expected.numpy().astype(np.uint32)), seed
