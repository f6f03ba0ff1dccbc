"""Keyed verification of sampled requests inside SGLang's EAGLE verify (whiflash_sgl/sglang/keyed_verify.py).

The mapping from SGLang's request parameters and the row replacement need nothing from SGLang; the last tests run
SGLang 0.5.23's own ``eagle_sample`` (its CPU greedy branch) on a hand-built verify batch inside ``keyed_verify``,
with the stand-in's greedy tree walk.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from whiflash_sgl.sampling import KeyedSampler, SamplingParams
from whiflash_sgl.sglang.keyed_verify import DEFAULT_SEED, TOP_K_ALL, keyed_predictions, keyed_verify, request_sampler

V, N = 64, 4  # vocabulary, verify rows per request (a chain: row r's child is row r + 1)


def sglang_params(temperature=1.0, top_p=1.0, top_k=TOP_K_ALL, min_p=0.0, sampling_seed=None):
    """A request's parameters as SGLang holds them after ``normalize`` (T = 0 is stored as top_k 1)."""
    return SimpleNamespace(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                           sampling_seed=sampling_seed)


def test_request_sampler_follows_sglangs_normalised_parameters():
    assert request_sampler(sglang_params(top_k=1)) is None  # greedy (T = 0 after normalize)
    assert request_sampler(sglang_params(min_p=0.1)) is None  # min_p: SGLang's argmax stays
    sampler = request_sampler(sglang_params(temperature=0.7, top_p=0.9))
    assert sampler.params == SamplingParams(temperature=0.7, top_p=0.9, top_k=0) and sampler.seed == DEFAULT_SEED
    assert request_sampler(sglang_params(top_k=-1)).params.top_k == 0
    assert request_sampler(sglang_params(top_k=5, sampling_seed=2**63 - 1)).params.top_k == 5
    assert request_sampler(sglang_params(sampling_seed=2**40 + 3)).seed == 2**40 + 3
    assert request_sampler(sglang_params(sampling_seed=-1)).seed == 2**64 - 1  # SGLang's uint64 cast


def test_keyed_predictions_replace_only_the_sampled_requests_rows():
    torch.manual_seed(0)
    logits = torch.randn(3 * N, V) * 3
    positions = torch.tensor([10, 11, 12, 13, 5, 6, 7, 8, 40, 41, 42, 43])
    argmax = logits.argmax(-1).view(3, N)
    samplers = [None, KeyedSampler(SamplingParams(1.0, 0.9), 7), KeyedSampler(SamplingParams(0.8, 1.0, 20), 2**40)]
    predict = keyed_predictions(argmax, logits, positions, samplers)
    assert predict.dtype == argmax.dtype and predict[0].tolist() == argmax[0].tolist()
    for i in (1, 2):
        rows = slice(i * N, (i + 1) * N)
        assert predict[i].tolist() == samplers[i].sample(logits[rows], positions[rows])
    assert argmax.tolist() == logits.argmax(-1).view(3, N).tolist()  # SGLang's tensor is left as it was
    with pytest.raises(ValueError, match="2 requests for a verify batch of 3"):
        keyed_predictions(argmax, logits, positions, samplers[:2])


# ---- inside SGLang's eagle_sample ---------------------------------------------------------------------------------


@pytest.fixture
def sglang_verify(monkeypatch):
    """SGLang's ``eagle_utils`` as on the CPU engine: the greedy branch, the stand-in's tree walk."""
    pytest.importorskip("sglang.srt.plugins", reason="SGLang is not installed; run launch/install_sglang_cpu.sh")
    sgl_kernel = pytest.importorskip("sgl_kernel", reason="the sgl_kernel stand-in is not installed")
    if not getattr(sgl_kernel, "WHIFLASH_CPU_STANDIN", False):
        pytest.skip("sgl_kernel is not the WhiFlash CPU stand-in")
    from whiflash_sgl.sglang import torchvision_stub

    torchvision_stub.install()
    from sglang.srt.speculative import eagle_utils, eagle_worker_common

    def walk(*, retrieve_index, retrieve_next_token, retrieve_next_sibling, topk=-1, **kw):
        sgl_kernel.verify_tree_greedy_cpu(retrive_index=retrieve_index, retrive_next_token=retrieve_next_token,
                                          retrive_next_sibling=retrieve_next_sibling, **kw)
        return kw["predicts"], kw["accept_index"], kw["accept_token_num"]

    monkeypatch.setattr(eagle_utils, "_is_cpu", True)
    monkeypatch.setattr(eagle_utils, "verify_tree_greedy_func", walk)
    monkeypatch.setattr(eagle_utils, "get_spec", lambda: SimpleNamespace(speculative_use_rejection_sampling=False))
    return eagle_utils, eagle_worker_common


def verify_batch(candidates: torch.Tensor, logits: torch.Tensor, seq_lens: list[int], params, logit_bias=None):
    """SGLang's verify inputs for chains of N rows per request, drafts ``candidates`` ``[bs, N]`` (row 0: the bonus)."""
    bs = len(seq_lens)
    chain = torch.tensor([1, 2, 3, -1]).repeat(bs, 1)
    verify_input = SimpleNamespace(
        draft_token=candidates.flatten(), draft_token_num=N, max_tree_depth=N, tree_topk=1,
        retrieve_index=torch.arange(bs * N).view(bs, N), retrieve_next_token=chain,
        retrieve_next_sibling=torch.full((bs, N), -1),
        positions=(torch.tensor(seq_lens).unsqueeze(1) + torch.arange(N)).flatten())
    sampling_info = SimpleNamespace(acc_additive_penalties=None, acc_scaling_penalties=None, logit_bias=logit_bias,
                                    is_all_greedy=all(p.top_k <= 1 for p in params), has_watermark_candidates=False)
    batch = SimpleNamespace(forward_mode=SimpleNamespace(is_idle=lambda: False), device="cpu",
                            seq_lens=torch.tensor(seq_lens), sampling_info=sampling_info,
                            reqs=[SimpleNamespace(sampling_params=p) for p in params])
    return verify_input, batch, SimpleNamespace(next_token_logits=logits.clone())


def test_sglangs_eagle_sample_accepts_the_keyed_samples_of_sampled_requests(sglang_verify):
    eagle_utils, eagle_worker_common = sglang_verify
    original = (eagle_worker_common.eagle_sample, eagle_utils.verify_tree_greedy_func)
    logits = torch.randn(2 * N, V, generator=torch.Generator().manual_seed(8)) * 2
    seq_lens = [9, 2**20]
    params = [sglang_params(top_k=1), sglang_params(temperature=1.0, top_p=0.9, sampling_seed=2**40 + 5)]
    keyed = KeyedSampler(SamplingParams(1.0, 0.9), 2**40 + 5).sample(logits[N:], seq_lens[1] + torch.arange(N))
    argmax = logits.argmax(-1).view(2, N)
    assert keyed[0] != argmax[1, 0]  # the test tells the keyed rule from SGLang's argmax
    # request 0 (greedy) drafts the argmax at its root only; request 1 drafts its keyed samples for two rows
    top = argmax.tolist()
    candidates = torch.tensor([[5, top[0][0], (top[0][1] + 1) % V, 0], [5, keyed[0], keyed[1], (keyed[2] + 1) % V]])
    verify_input, batch, logits_output = verify_batch(candidates, logits, seq_lens, params)

    with keyed_verify(batch.reqs):
        predict, accept_lens, accept_index = eagle_worker_common.eagle_sample(verify_input, batch, logits_output)
    assert (eagle_worker_common.eagle_sample, eagle_utils.verify_tree_greedy_func) == original
    assert accept_lens.tolist() == [2, 3]
    assert accept_index.tolist() == [[0, 1, -1, -1], [4, 5, 6, -1]]
    committed = predict[accept_index[accept_index >= 0]].tolist()
    assert committed == [*top[0][:2], *keyed[:3]]  # the bonus of request 1 is its keyed sample too

    # without keyed_verify, SGLang's CPU verify compares request 1's drafts with the argmax
    verify_input, batch, logits_output = verify_batch(candidates, logits, seq_lens, params)
    _, accept_lens, _ = eagle_worker_common.eagle_sample(verify_input, batch, logits_output)
    assert accept_lens.tolist() == [2, 1]


def test_the_keyed_draw_sees_sglangs_logit_bias_and_restores_on_error(sglang_verify):
    eagle_utils, eagle_worker_common = sglang_verify
    original = (eagle_worker_common.eagle_sample, eagle_utils.verify_tree_greedy_func)
    logits = torch.randn(N, V, generator=torch.Generator().manual_seed(2))
    bias = torch.zeros(1, V)
    bias[0, 17] = 1000.0  # SGLang adds the request's logit bias in place before its argmax
    params = [sglang_params(temperature=0.7, top_p=0.9)]
    verify_input, batch, logits_output = verify_batch(torch.tensor([[5, 17, 17, 17]]), logits, [30], params, bias)
    with keyed_verify(batch.reqs):
        predict, accept_lens, accept_index = eagle_worker_common.eagle_sample(verify_input, batch, logits_output)
    assert accept_lens.tolist() == [4] and predict[accept_index[0]].tolist() == [17] * 4

    with pytest.raises(RuntimeError, match="boom"), keyed_verify(batch.reqs):
        assert eagle_worker_common.eagle_sample is not original[0]
        raise RuntimeError("boom")
    assert (eagle_worker_common.eagle_sample, eagle_utils.verify_tree_greedy_func) == original


def test_an_all_greedy_batch_is_left_to_sglang(sglang_verify):
    eagle_utils, eagle_worker_common = sglang_verify
    original = eagle_worker_common.eagle_sample
    with keyed_verify([SimpleNamespace(sampling_params=sglang_params(top_k=1))]):
        assert eagle_worker_common.eagle_sample is original
    with keyed_verify(()):
        assert eagle_worker_common.eagle_sample is original

