"""The pure-PyTorch sgl_kernel CPU stand-in (sgl_kernel_cpu/), op by op, against naive formulas written here.

Skipped unless the stand-in is installed (launch/install_sgl_kernel_cpu.sh).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sgl_kernel = pytest.importorskip("sgl_kernel")
if not getattr(sgl_kernel, "WHIFLASH_CPU_STANDIN", False):
    pytest.skip("sgl_kernel is not the WhiFlash CPU stand-in", allow_module_level=True)

ops = torch.ops.sgl_kernel


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)).to(dtype)


def _tol(dtype):
    return dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# package


def test_marker_registration_and_idempotent_import():
    assert sgl_kernel.WHIFLASH_CPU_STANDIN is True
    for name in ("rmsnorm_cpu", "fused_add_rmsnorm_cpu", "silu_and_mul_cpu", "gelu_tanh_and_mul_cpu",
                 "gelu_and_mul_cpu", "rotary_embedding_cpu", "convert_weight_packed", "weight_packed_linear",
                 "decode_attention_cpu", "extend_attention_cpu", "store_cache_cpu", "fused_qk_norm_cpu",
                 "murmur_hash32_cpu", "init_cpu_threads_env", "initialize", "verify_tree_greedy_cpu",
                 "build_tree_kernel_efficient_cpu", "assign_req_to_token_pool_cpu", "copy_all_layer_kv_cache_cpu"):
        assert hasattr(ops, name), name
    assert hasattr(ops.murmur_hash32_cpu, "default")
    for name in ("assign_req_to_token_pool_cpu", "copy_all_layer_kv_cache_cpu", "build_tree_kernel_efficient_cpu",
                 "verify_tree_greedy_cpu", "assign_draft_cache_locs_contiguous_cpu", "assign_extend_cache_locs_cpu",
                 "fill_accept_out_cache_loc_cpu", "fill_bonus_tokens_cpu", "rotate_input_ids_cpu",
                 "build_draft_decode_metadata_cpu"):
        assert callable(getattr(sgl_kernel, name)), name
    from sgl_kernel.speculative import reconstruct_indices_from_tree_mask  # noqa: F401

    importlib.reload(sgl_kernel._ops)
    importlib.reload(sgl_kernel)
    assert ops.rmsnorm_cpu(torch.ones(1, 4), torch.ones(4), 0.0).shape == (1, 4)


def test_refuses_to_load_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    init = Path(sgl_kernel.__file__)
    spec = importlib.util.spec_from_file_location("_sgl_kernel_guard_probe", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(ImportError, match="CPU-only stand-in"):
        spec.loader.exec_module(module)


# --------------------------------------------------------------------------------------------------------------
# norms and activations


def _naive_rmsnorm_rows(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.float64)
    for r in range(x.shape[0]):
        row = x[r].double()
        inv = 1.0 / math.sqrt(sum(float(v) ** 2 for v in row) / row.numel() + eps)
        out[r] = row * inv * w.double()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm(dtype):
    x, w = _randn(5, 16, seed=1, dtype=dtype), _randn(16, seed=2, dtype=dtype)
    out = ops.rmsnorm_cpu(x, w, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), _naive_rmsnorm_rows(x, w, 1e-5), **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rmsnorm_mutates_both(dtype):
    x, r, w = (_randn(4, 32, seed=s, dtype=dtype) for s in (3, 4, 5))
    w = w[0]
    x0, r0 = x.clone(), r.clone()
    assert ops.fused_add_rmsnorm_cpu(x, r, w, 1e-6) is None
    total = x0.double() + r0.double()
    torch.testing.assert_close(r.double(), total, **_tol(dtype))
    torch.testing.assert_close(x.double(), _naive_rmsnorm_rows(total, w, 1e-6), **_tol(dtype))


def test_fused_qk_norm_on_strided_views_of_qkv():
    t, hq, hk, d = 3, 4, 2, 8
    qkv = _randn(t, (hq + 2 * hk) * d, seed=6, dtype=torch.bfloat16)
    ref = qkv.clone()
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    qw, kw = _randn(d, seed=7, dtype=torch.bfloat16), _randn(d, seed=8, dtype=torch.bfloat16)
    ops.fused_qk_norm_cpu(q, k, qw, kw, 1e-6)
    q_ref = _naive_rmsnorm_rows(ref[:, :hq * d].reshape(-1, d), qw, 1e-6).view(t, -1)
    k_ref = _naive_rmsnorm_rows(ref[:, hq * d:(hq + hk) * d].reshape(-1, d), kw, 1e-6).view(t, -1)
    torch.testing.assert_close(qkv[:, :hq * d].double(), q_ref, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(qkv[:, hq * d:(hq + hk) * d].double(), k_ref, atol=3e-2, rtol=2e-2)
    assert torch.equal(qkv[:, (hq + hk) * d:], ref[:, (hq + hk) * d:])  # v untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_activations(dtype):
    x = _randn(3, 2, 10, seed=9, dtype=dtype)
    a, g = x[..., :5].double(), x[..., 5:].double()
    silu = a / (1 + torch.exp(-a)) * g
    gelu = 0.5 * a * (1 + torch.erf(a / math.sqrt(2))) * g
    gelu_tanh = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3))) * g
    for op, ref in ((ops.silu_and_mul_cpu, silu), (ops.gelu_and_mul_cpu, gelu),
                    (ops.gelu_tanh_and_mul_cpu, gelu_tanh)):
        out = op(x)
        assert out.dtype == dtype and out.shape == (3, 2, 5)
        torch.testing.assert_close(out.double(), ref, **_tol(dtype))
    assert not torch.allclose(ops.gelu_and_mul_cpu(x.float()), ops.gelu_tanh_and_mul_cpu(x.float()), atol=1e-7)


# --------------------------------------------------------------------------------------------------------------
# rotary embedding


def _cos_sin_cache(max_pos: int, rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = [base ** (-2 * i / rotary_dim) for i in range(rotary_dim // 2)]
    cos = [[math.cos(p * f) for f in inv_freq] for p in range(max_pos)]
    sin = [[math.sin(p * f) for f in inv_freq] for p in range(max_pos)]
    return torch.cat((torch.tensor(cos), torch.tensor(sin)), dim=-1)


def _naive_rope(x: torch.Tensor, positions: list[int], cache: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """x [T, H, D]; rotate each (a, b) pair by its angle, element by element."""
    rd = cache.shape[1]
    out = x.double().clone()
    for t, p in enumerate(positions):
        for h in range(x.shape[1]):
            for i in range(rd // 2):
                c, s = float(cache[p, i]), float(cache[p, rd // 2 + i])
                ia, ib = (i, i + rd // 2) if is_neox else (2 * i, 2 * i + 1)
                a, b = float(x[t, h, ia]), float(x[t, h, ib])
                out[t, h, ia] = a * c - b * s
                out[t, h, ib] = b * c + a * s
    return out


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [8, 4])
def test_rotary_2d_in_place_on_qkv_views(is_neox, rotary_dim):
    t, hq, hk, d = 4, 3, 1, 8
    cache = _cos_sin_cache(32, rotary_dim)
    positions = torch.tensor([0, 5, 17, 31])
    qkv = _randn(t, (hq + 2 * hk) * d, seed=10)
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q_ref = _naive_rope(q.reshape(t, hq, d), positions.tolist(), cache, is_neox)
    k_ref = _naive_rope(k.reshape(t, hk, d), positions.tolist(), cache, is_neox)
    q_out, k_out = ops.rotary_embedding_cpu(positions, q, k, d, cache, is_neox)
    torch.testing.assert_close(q_out.reshape(t, hq, d).double(), q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_out.reshape(t, hk, d).double(), k_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.reshape(t, hq, d).double(), q_ref, atol=1e-5, rtol=1e-5)  # in place
    if rotary_dim < d:
        assert torch.equal(q.reshape(t, hq, d)[..., rotary_dim:].double(), q_ref[..., rotary_dim:])


def test_rotary_3d_returns_new_tensors_and_4d_is_in_place():
    cache = _cos_sin_cache(16, 8).bfloat16()
    positions = torch.tensor([1, 2, 9])
    q, k = _randn(3, 2, 8, seed=11, dtype=torch.bfloat16), _randn(3, 1, 8, seed=12, dtype=torch.bfloat16)
    q0, k0 = q.clone(), k.clone()
    q_out, k_out = ops.rotary_embedding_cpu(positions, q, k, 8, cache, True)
    assert torch.equal(q, q0) and torch.equal(k, k0)
    torch.testing.assert_close(q_out.double(), _naive_rope(q0, positions.tolist(), cache, True), **_tol(torch.bfloat16))

    q4, k4 = q0.clone().view(1, 3, 2, 8), k0.clone().view(1, 3, 1, 8)
    q4_out, _ = ops.rotary_embedding_cpu(positions.view(1, 3), q4, k4, 8, cache, False)
    ref = _naive_rope(q0, positions.tolist(), cache, False)
    torch.testing.assert_close(q4.view(3, 2, 8).double(), ref, **_tol(torch.bfloat16))
    assert q4_out.data_ptr() == q4.data_ptr()


# --------------------------------------------------------------------------------------------------------------
# linear and caches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_packed_linear(dtype, with_bias):
    x, w = _randn(5, 32, seed=13, dtype=dtype), _randn(16, 32, seed=14, dtype=dtype)
    bias = _randn(16, seed=15, dtype=dtype) if with_bias else None
    packed = ops.convert_weight_packed(w)
    assert packed.shape == w.shape and packed.data_ptr() != w.data_ptr()
    out = ops.weight_packed_linear(x, packed, bias, True)
    assert out.dtype == dtype and out.shape == (5, 16)
    ref = torch.tensor([[sum(float(x[m, kk]) * float(w[n, kk]) for kk in range(32))
                         + (float(bias[n]) if with_bias else 0.0) for n in range(16)] for m in range(5)],
                       dtype=torch.float64)
    torch.testing.assert_close(out.double(), ref, atol=0.25 if dtype == torch.bfloat16 else 1e-4, rtol=2e-2)


def test_store_cache():
    k_cache, v_cache = torch.zeros(10, 2, 4, dtype=torch.bfloat16), torch.zeros(10, 2, 4, dtype=torch.bfloat16)
    k, v = _randn(3, 2, 4, seed=16, dtype=torch.bfloat16), _randn(3, 2, 4, seed=17, dtype=torch.bfloat16)
    ops.store_cache_cpu(k, v, k_cache, v_cache, torch.tensor([7, 1, 4]), 8)
    for j, slot in enumerate([7, 1, 4]):
        assert torch.equal(k_cache[slot], k[j]) and torch.equal(v_cache[slot], v[j])
    assert k_cache[[0, 2, 3, 5, 6, 8, 9]].abs().sum() == 0


def test_assign_req_to_token_pool():
    req_to_token = torch.full((4, 12), -1, dtype=torch.int32)
    out_cache_loc = torch.tensor([100, 101, 102, 200, 300, 301], dtype=torch.int64)
    sgl_kernel.assign_req_to_token_pool_cpu(torch.tensor([2, 0, 3]), req_to_token, torch.tensor([5, 0, 4]),
                                            torch.tensor([8, 1, 6]), out_cache_loc, 12)
    assert req_to_token[2, 5:8].tolist() == [100, 101, 102]
    assert req_to_token[0, 0:1].tolist() == [200]
    assert req_to_token[3, 4:6].tolist() == [300, 301]
    assert int((req_to_token != -1).sum()) == 6 and req_to_token[1].eq(-1).all()


def test_copy_all_layer_kv_cache_by_raw_pointers():
    k = torch.arange(6 * 4, dtype=torch.bfloat16).view(6, 2, 2)
    scale = torch.arange(6 * 3, dtype=torch.float32).view(6, 3)
    k_ref, scale_ref = k.clone(), scale.clone()
    data_ptrs = torch.tensor([k.data_ptr(), scale.data_ptr()], dtype=torch.uint64)
    strides = torch.tensor([k.stride(0) * k.element_size(), scale.stride(0) * scale.element_size()])
    tgt, src = torch.tensor([0, 5, 2]), torch.tensor([3, 0, 2])
    sgl_kernel.copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt, src)
    for t, s in zip(tgt.tolist(), src.tolist()):
        k_ref[t], scale_ref[t] = k_ref[s].clone(), scale_ref[s].clone()
    # slot 5 takes the *old* slot 0: every source is read before a target is written
    k_ref[5], scale_ref[5] = torch.arange(4, dtype=torch.bfloat16).view(2, 2), torch.arange(3.0)
    assert torch.equal(k, k_ref) and torch.equal(scale, scale_ref)
    before = k.clone()
    zeros = torch.zeros(4, dtype=torch.int64)
    sgl_kernel.copy_all_layer_kv_cache_cpu(data_ptrs, strides, zeros, zeros)  # SGLang's warm-up call
    assert torch.equal(k, before)


# --------------------------------------------------------------------------------------------------------------
# attention


def _naive_attention_row(q: torch.Tensor, keys: list[tuple[torch.Tensor, torch.Tensor]], scale: float, cap: float,
                         sink) -> torch.Tensor:
    """One query head over an explicit list of (k, v) with an explicit softmax."""
    logits = []
    for kv_k, _ in keys:
        s = sum(float(a) * float(b) for a, b in zip(q, kv_k)) * scale
        if cap > 0:
            s = cap * math.tanh(s / cap)
        logits.append(s)
    m = max(logits + ([float(sink)] if sink is not None else []))
    weights = [math.exp(s - m) for s in logits]
    denom = sum(weights) + (math.exp(float(sink) - m) if sink is not None else 0.0)
    out = torch.zeros(keys[0][1].shape[0], dtype=torch.float64)
    for wgt, (_, kv_v) in zip(weights, keys):
        out += wgt / denom * kv_v.double()
    return out


def _pool(num_slots, hk, d, dv, seed, dtype):
    return _randn(num_slots, hk, d, seed=seed, dtype=dtype), _randn(num_slots, hk, dv, seed=seed + 1, dtype=dtype)


DECODE_CASES = {
    "plain": dict(),
    "window": dict(window=3),
    "logit_cap": dict(cap=0.5),
    "sinks": dict(sinks=True),
    "k_scale": dict(k_scale=0.5, v_scale=2.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_attention(case, dtype):
    opts = DECODE_CASES[case]
    window, cap = opts.get("window", 0), opts.get("cap", 0.0)
    k_scale, v_scale = opts.get("k_scale", 1.0), opts.get("v_scale", 1.0)
    b, hq, hk, d, dv, slots = 2, 4, 2, 8, 6, 40
    k_buf, v_buf = _pool(slots, hk, d, dv, 20, dtype)
    q = _randn(b, hq, d, seed=22, dtype=dtype)
    key, value = _randn(b, hk * d, seed=23, dtype=dtype), _randn(b, hk * dv, seed=24, dtype=dtype)
    sinks = _randn(hq, seed=25) if opts.get("sinks") else None
    req_to_token = torch.zeros(3, 16, dtype=torch.int32)
    req_to_token[2, :5] = torch.tensor([3, 17, 9, 30, 11])  # request 0: 5 tokens, the last one new at slot 11
    req_to_token[0, :7] = torch.tensor([1, 2, 33, 4, 5, 6, 38])  # request 1: 7 tokens, new at slot 38
    rpi, seq_lens, loc = torch.tensor([2, 0]), torch.tensor([5, 7]), torch.tensor([11, 38])
    out = torch.full((b, hq, dv), float("nan"), dtype=dtype)
    scale = 1 / math.sqrt(d)
    ops.decode_attention_cpu(q, k_buf, v_buf, k_scale, v_scale, out, key, value, loc,
                             torch.zeros(b, hq, 8, dv + 1), req_to_token, rpi, seq_lens, scale, cap, False, window,
                             None, sinks)
    assert torch.equal(k_buf[11], key[0].view(hk, d)) and torch.equal(v_buf[38], value[1].view(hk, dv))
    for i in range(b):
        seq = int(seq_lens[i])
        visible = [j for j in range(seq) if window == 0 or (seq - 1) - j < window]
        for h in range(hq):
            kv = [(k_buf[int(req_to_token[rpi[i], j])][h // 2].double() * k_scale,
                   v_buf[int(req_to_token[rpi[i], j])][h // 2].double() * v_scale) for j in visible]
            ref = _naive_attention_row(q[i, h].double(), kv, scale, cap, None if sinks is None else sinks[h])
            torch.testing.assert_close(out[i, h].double(), ref, **_tol(dtype))


EXTEND_CASES = {
    "causal": dict(),
    "no_prefix": dict(prefix=(0, 0)),
    "non_causal": dict(causal=False),
    "tree_mask": dict(tree=True),
    "window": dict(window=3),
    "logit_cap_and_sinks": dict(cap=0.7, sinks=True),
    "kv_from_cache": dict(kv_none=True),
    "kv_flat": dict(kv_flat=True),
}


def _tree_block(n: int, seed: int) -> torch.Tensor:
    """A random tree over n nodes as an ancestor mask (row = query, True = visible; self and root always)."""
    g = _gen(seed)
    parent = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j != -1:
            m[i, j] = True
            j = parent[j]
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(EXTEND_CASES))
def test_extend_attention(case, dtype):
    opts = EXTEND_CASES[case]
    window, cap, causal = opts.get("window", 0), opts.get("cap", 0.0), opts.get("causal", True)
    prefixes, exts = opts.get("prefix", (3, 5)), (4, 3)
    hq, hk, d, dv, slots = 4, 2, 8, 8, 48
    k_buf, v_buf = _pool(slots, hk, d, dv, 30, dtype)
    n_tok = sum(exts)
    q = _randn(n_tok, hq, d, seed=32, dtype=dtype)
    k_new, v_new = _randn(n_tok, hk, d, seed=33, dtype=dtype), _randn(n_tok, hk, dv, seed=34, dtype=dtype)
    sinks = _randn(hq, seed=35) if opts.get("sinks") else None
    rows, perm = torch.tensor([1, 3]), torch.randperm(slots, generator=_gen(36))
    req_to_token = torch.zeros(4, 16, dtype=torch.int32)
    used = 0
    starts = []
    for r, (p, e) in zip(rows.tolist(), zip(prefixes, exts)):
        req_to_token[r, :p + e] = perm[used:used + p + e].int()
        used += p + e
    start = 0
    for r, (p, e) in zip(rows.tolist(), zip(prefixes, exts)):  # new tokens' K/V are in the cache already
        k_buf[req_to_token[r, p:p + e].long()] = k_new[start:start + e]
        v_buf[req_to_token[r, p:p + e].long()] = v_new[start:start + e]
        starts.append(start)
        start += e
    blocks = [_tree_block(e, 37 + i) for i, e in enumerate(exts)] if opts.get("tree") else None
    tree_mask = torch.cat([blk.flatten() for blk in blocks]) if blocks else None
    seq_lens = torch.tensor([p + e for p, e in zip(prefixes, exts)])
    o = torch.full((n_tok, hq, dv), float("nan"), dtype=dtype)
    scale = 0.3
    kx, vx = (None, None) if opts.get("kv_none") else (k_new, v_new)
    if opts.get("kv_flat"):
        kx, vx = k_new.flatten(1), v_new.flatten(1)
    ops.extend_attention_cpu(q, kx, vx, o, k_buf, v_buf, 1.0, 1.0, req_to_token, rows, seq_lens,
                             torch.tensor(exts, dtype=torch.int32), torch.tensor(starts, dtype=torch.int32),
                             max(exts), scale, cap, False, window, None, sinks, tree_mask, causal)
    for b, (r, p, e, s0) in enumerate(zip(rows.tolist(), prefixes, exts, starts)):
        for i in range(e):
            qpos = p + i
            visible = []
            for j in range(p + e):
                if j >= p:
                    jn = j - p
                    if blocks is not None and not blocks[b][i, jn]:
                        continue
                    if blocks is None and causal and jn > i:
                        continue
                if window and qpos - j >= window:
                    continue
                visible.append(j)
            for h in range(hq):
                kv = [(k_buf[int(req_to_token[r, j])][h // 2].double(), v_buf[int(req_to_token[r, j])][h // 2].double())
                      for j in visible]
                ref = _naive_attention_row(q[s0 + i, h].double(), kv, scale, cap, None if sinks is None else sinks[h])
                torch.testing.assert_close(o[s0 + i, h].double(), ref, **_tol(dtype))


# --------------------------------------------------------------------------------------------------------------
# hashing and process setup

# SGLang 0.5.23's own murmur_hash32_kernel (kernels/ops/sampling/murmur_hash.py), run under TRITON_INTERPRET=1.
_MURMUR_SEEDS = [1, 2 ** 40 + 5, 2 ** 63 + 7, 0]
_MURMUR_POSITIONS = [3, 4, 2 ** 33 + 1, 0]
_MURMUR_EXPECTED = [
    [4121973084, 2993210623, 808334041, 4074602147, 2564986006],
    [4279292228, 4075147864, 4164400762, 3479628760, 2003104209],
    [710199214, 3252145689, 2841212481, 1423107749, 3649376715],
    [2167721464, 10027521, 2423355346, 1368026766, 78347357],
]


def test_murmur_hash32_matches_sglang_values():
    seed = torch.tensor(_MURMUR_SEEDS, dtype=torch.uint64)
    out = ops.murmur_hash32_cpu.default(seed, torch.tensor(_MURMUR_POSITIONS), torch.arange(5))
    assert out.dtype == torch.uint32 and out.shape == (4, 5)
    assert out.long().tolist() == _MURMUR_EXPECTED
    signed = ops.murmur_hash32_cpu(seed.view(torch.int64), torch.tensor(_MURMUR_POSITIONS), torch.arange(5))
    assert signed.long().tolist() == _MURMUR_EXPECTED  # int64 seeds carry the same bits


_MURMUR_PROBE = r"""
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("_murmur_ref", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
seed = torch.tensor([int(s) for s in sys.argv[2].split(",")], dtype=torch.uint64)
pos = torch.tensor([int(p) for p in sys.argv[3].split(",")]); col = torch.arange(37) * 7919
out = torch.empty((seed.numel(), col.numel()), dtype=torch.uint32)
mod.murmur_hash32_kernel[(seed.numel(), 1)](seed, pos, col, out, seed.numel(), col.numel(), BLOCK_SIZE=64)
print(out.long().tolist())
"""


def test_murmur_hash32_against_sglang_triton_reference_live():
    """Runs SGLang's triton kernel under the triton interpreter (skipped without sglang/triton)."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or importlib.util.find_spec("triton") is None:
        pytest.skip("sglang and triton are needed for the live reference")
    path = Path(spec.submodule_search_locations[0]) / "kernels" / "ops" / "sampling" / "murmur_hash.py"
    if not path.exists():
        pytest.skip("no murmur_hash.py in this sglang")
    seeds = [int(s) for s in torch.randint(0, 2 ** 62, (6,), generator=_gen(40))] + [2 ** 64 - 1]
    positions = [int(p) for p in torch.randint(0, 2 ** 40, (7,), generator=_gen(41))]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", _MURMUR_PROBE, str(path), ",".join(map(str, seeds)),
                          ",".join(map(str, positions))], capture_output=True, text=True, env=env, timeout=120)
    if res.returncode != 0:
        pytest.skip(f"triton interpreter unavailable: {res.stderr.strip().splitlines()[-1:]}")
    expected = eval(res.stdout.strip().splitlines()[-1])  # a list of lists of ints printed by the probe
    mine = ops.murmur_hash32_cpu(torch.tensor(seeds, dtype=torch.uint64), torch.tensor(positions),
                                 torch.arange(37) * 7919)
    assert mine.long().tolist() == expected


def test_thread_setup_ops():
    threads = torch.get_num_threads()
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        cpus = sorted(affinity)[:1] if affinity else [0]
        msg = ops.init_cpu_threads_env(",".join(map(str, cpus)))
        assert isinstance(msg, str) and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
        if affinity:
            os.sched_setaffinity(0, affinity)
    assert ops.initialize(1, 0) is None
    with pytest.raises(RuntimeError, match="tensor parallelism"):
        ops.initialize(2, 0)


# --------------------------------------------------------------------------------------------------------------
# speculative decoding
#
# A hand-built EAGLE draft with topk=2 and 3 steps. Candidate ids index the flattened per-step top-k lists:
#   step 0: c0, c1 (children of the root); step 1 expands c0, c1: c2, c3 (of c0), c4, c5 (of c1);
#   step 2 expands c2, c5: c6, c7 (of c2), c8, c9 (of c5).
# parent_list[slot] is the candidate expanded into slot `slot` (slot = candidate // topk; slot 0 = the root).
TOPK, DEPTH, N = 2, 3, 6
PARENT_LIST = [-1, 0, 1, 2, 5]
# request 0 selects c0 c1 c2 c5 c6 -> nodes 1..5; tree 0 -> {1, 2}, 1 -> 3, 3 -> 5, 2 -> 4
# request 1 selects c0 c1 c2 c3 c4 -> tree 0 -> {1, 2}, 1 -> {3, 4}, 2 -> 5
# request 2 selects c0 c1 c5 c6 c8: c6's parent c2 is not selected, so node 4 hangs off nothing
SELECTED = [[0, 1, 2, 5, 6], [0, 1, 2, 3, 4], [0, 1, 5, 6, 8]]
NEXT_TOKEN = [[1, 3, 4, 5, -1, -1], [1, 3, 5, -1, -1, -1], [1, -1, 3, 5, -1, -1]]
NEXT_SIBLING = [[-1, 2, -1, -1, -1, -1], [-1, 2, -1, 4, -1, -1], [-1, 2, -1, -1, -1, -1]]
DEPTHS = [[0, 1, 1, 2, 2, 3], [0, 1, 1, 2, 2, 2], [0, 1, 1, 2, 1, 3]]
MASKS = [  # row = node, columns = root, self and ancestors
    ["100000", "110000", "101000", "110100", "101010", "110101"],
    ["100000", "110000", "101000", "110100", "110010", "101001"],
    ["100000", "110000", "101000", "101100", "100010", "101101"],
]


def _mask_rows(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in r] for r in rows])


def _build_tree(seq_lens, mode: int):
    bs = len(seq_lens)
    parent_list = torch.tensor([PARENT_LIST] * bs)
    selected = torch.tensor(SELECTED[:bs])
    if mode == 1:
        tree_mask = torch.full((bs * N * N,), True)
    else:
        tree_mask = torch.full((sum(seq_lens) * N + bs * N * N,), True)
    positions = torch.empty(bs * N, dtype=torch.int64)
    retrive = torch.full((3, bs, N), -1, dtype=torch.int64)
    sgl_kernel.build_tree_kernel_efficient_cpu(parent_list, selected, torch.tensor(seq_lens), tree_mask, positions,
                                               retrive[0], retrive[1], retrive[2], TOPK, DEPTH, N, mode)
    return tree_mask, positions, retrive


def test_build_tree_qlen_only():
    seq_lens = [7, 3, 5]
    tree_mask, positions, (index, next_token, next_sibling) = _build_tree(seq_lens, 1)
    assert index.tolist() == [list(range(b * N, (b + 1) * N)) for b in range(3)]
    assert next_token.tolist() == NEXT_TOKEN
    assert next_sibling.tolist() == NEXT_SIBLING
    assert positions.view(3, N).tolist() == [[s + d for d in ds] for s, ds in zip(seq_lens, DEPTHS)]
    for b in range(3):
        assert torch.equal(tree_mask.view(3, N, N)[b], _mask_rows(MASKS[b])), b


def test_build_tree_full_mask_layout():
    seq_lens = [2, 4]
    tree_mask, positions, _ = _build_tree(seq_lens, 0)
    base = 0
    for b, seq in enumerate(seq_lens):
        block = tree_mask[base:base + N * (seq + N)].view(N, seq + N)
        assert block[:, :seq].all()  # the prefix columns keep the caller's fill
        assert torch.equal(block[:, seq:], _mask_rows(MASKS[b]))
        base += N * (seq + N)
    with pytest.raises(NotImplementedError):
        _build_tree(seq_lens, 2)


def test_verify_tree_greedy():
    bs = 3
    next_token = torch.tensor([NEXT_TOKEN[0]] * bs)
    next_sibling = torch.tensor([NEXT_SIBLING[0]] * bs)
    index = torch.arange(bs * N).view(bs, N)
    candidates = torch.tensor([[50, 11, 12, 13, 14, 15]] * bs)  # node i proposes token 10 + i (root: the bonus)
    target = torch.full((bs, N), 99)
    # request 0: root predicts 12 (node 2, the second child), node 2 predicts 14 (node 4), node 4 predicts 77
    target[0, 0], target[0, 2], target[0, 4] = 12, 14, 77
    # request 1: the whole chain 0 -> 1 -> 3 -> 5 matches; node 5 (a leaf) predicts 88
    target[1, 0], target[1, 1], target[1, 3], target[1, 5] = 11, 13, 15, 88
    # request 2: nothing matches at the root
    target[2, 0] = 42
    predicts = torch.zeros(bs * N, dtype=torch.int32)
    accept_index = torch.full((bs, DEPTH + 1), -1, dtype=torch.int32)
    accept_num = torch.empty(bs, dtype=torch.int32)
    sgl_kernel.verify_tree_greedy_cpu(predicts=predicts, accept_index=accept_index, accept_token_num=accept_num,
                                      candidates=candidates, retrive_index=index, retrive_next_token=next_token,
                                      retrive_next_sibling=next_sibling, target_predict=target)
    assert accept_index.tolist() == [[0, 2, 4, -1], [6, 7, 9, 11], [12, -1, -1, -1]]
    assert accept_num.tolist() == [2, 3, 0]
    expected = [0] * (bs * N)
    expected[0], expected[2], expected[4] = 12, 14, 77
    expected[6], expected[7], expected[9], expected[11] = 11, 13, 15, 88
    expected[12] = 42
    assert predicts.tolist() == expected

    # the path length is bounded by accept_index's width
    short = torch.full((bs, 2), -1, dtype=torch.int32)
    ops.verify_tree_greedy_cpu(predicts, short, accept_num, candidates, index, next_token, next_sibling, target)
    assert short[1].tolist() == [6, 7] and accept_num[1] == 1


def test_reconstruct_indices_from_tree_mask():
    from sgl_kernel.speculative import reconstruct_indices_from_tree_mask

    bs = 3
    tree_mask = torch.cat([_mask_rows(m).flatten() for m in MASKS])
    seq = torch.tensor([7, 3, 5])
    positions = torch.empty(bs * N, dtype=torch.int64)
    index, next_token, next_sibling = (torch.full((bs, N), -7, dtype=torch.int64) for _ in range(3))
    reconstruct_indices_from_tree_mask(tree_mask, seq, positions, index, next_token, next_sibling, bs, N)
    assert positions.view(bs, N).tolist() == [[s + d for d in ds] for s, ds in zip(seq.tolist(), DEPTHS)]
    assert index.flatten().tolist() == list(range(bs * N))
    # from the mask alone, request 2's orphan node 4 is the root's child: it becomes node 2's next sibling
    assert next_token.tolist() == NEXT_TOKEN
    assert next_sibling.tolist() == [NEXT_SIBLING[0], NEXT_SIBLING[1], [-1, 2, 4, -1, -1, -1]]


def test_draft_and_extend_cache_locs():
    req_to_token = torch.arange(4 * 20, dtype=torch.int32).view(4, 20) + 1000
    out = torch.full((2 * 2 * 3,), -1, dtype=torch.int64)
    sgl_kernel.assign_draft_cache_locs_contiguous_cpu(torch.tensor([3, 1]), req_to_token, torch.tensor([5, 2]), out,
                                                      20, 2, 3)
    assert out.tolist() == list(range(1065, 1071)) + list(range(1022, 1028))

    out = torch.full((5,), -1, dtype=torch.int64)
    sgl_kernel.assign_extend_cache_locs_cpu(torch.tensor([2, 0, 1]), req_to_token, torch.tensor([4, 9, 0], dtype=torch.int32),
                                            torch.tensor([6, 9, 3], dtype=torch.int32), out, 20)
    assert out.tolist() == [1044, 1045, 1020, 1021, 1022]


def test_fill_accept_out_cache_loc_and_bonus_tokens():
    accept_index = torch.tensor([[0, 2, -1], [3, -1, -1], [6, 7, 8]], dtype=torch.int32)
    out_cache_loc = torch.arange(9, dtype=torch.int64) * 10 + 5
    accepted = torch.zeros(9, dtype=torch.int64)
    sgl_kernel.fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, accepted)
    assert accepted.tolist() == [5, 25, 35, 65, 75, 85, 0, 0, 0]

    accept_tokens = torch.tensor([[11, 12, 13], [21, 22, 23], [31, 32, 33]], dtype=torch.int32)
    bonus = torch.zeros(3, dtype=torch.int32)
    sgl_kernel.fill_bonus_tokens_cpu(accept_tokens, torch.tensor([2, 1, 3], dtype=torch.int32), bonus, 3)
    assert bonus.tolist() == [12, 21, 33]


def test_rotate_input_ids():
    ids = torch.tensor([1, 2, 3, 4, 5, 6, 7])
    sgl_kernel.rotate_input_ids_cpu(ids, torch.tensor([0, 4]), torch.tensor([4, 3]), torch.tensor([[90], [91]]))
    assert ids.tolist() == [2, 3, 4, 90, 6, 7, 91]
    ids = torch.tensor([1, 2, 3, 4, 5, 6, 7])
    sgl_kernel.rotate_input_ids_cpu(ids, torch.tensor([0, 4]), torch.tensor([4, 0]), torch.tensor([90, 91]),
                                    torch.tensor([1, 5]))
    assert ids.tolist() == [2, 90, 4, 4, 5, 6, 7]  # request 1 is empty: untouched


def test_build_draft_decode_metadata():
    req_to_token = torch.arange(3 * 16, dtype=torch.int32).view(3, 16)
    meta = sgl_kernel.build_draft_decode_metadata_cpu(req_to_token, torch.tensor([2, 0]), torch.tensor([3, 2]), 2, 3, 16)
    assert meta.dtype == torch.int32 and meta.shape == (4, 16)
    row2 = list(range(32, 48))
    assert meta[0, :6].tolist() == row2[:3] + row2[3:6]  # request 0, branch 0: slots 3..5 after its 3 tokens
    assert meta[1, :6].tolist() == row2[:3] + row2[6:9]  # branch 1: the next 3 slots
    assert meta[2, :5].tolist() == [0, 1, 2, 3, 4]
    assert meta[3, :5].tolist() == [0, 1, 5, 6, 7]


def test_unserved_ops_exist_and_refuse_by_name():
    """SGLang binds these at import; calling one must say the stand-in does not serve it, not fail obscurely."""
    from sgl_kernel import unserved

    for name in unserved.NAMES:
        op = getattr(torch.ops.sgl_kernel, name)
        with pytest.raises(NotImplementedError, match=name):
            op(torch.zeros(1), 2, flag=True)
    assert not hasattr(torch.ops.sgl_kernel, "fused_qk_norm_rope_cpu")  # probed by SGLang: must stay absent
