"""whiflash_sgl/kernels/: tree masks and positions, bit-packed masks, ragged batched tree attention, backends, batched acceptance."""

from __future__ import annotations

import os
import random
import shutil
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from whiflash_sgl.kernels import (
    AttentionLayout,
    BackendUnavailableError,
    ReferenceBackend,
    TreeBatch,
    accept_greedy_batch,
    accept_sampled_batch,
    available_backends,
    build_tree_mask,
    get_backend,
    pack_bits,
    ragged_tree_attention,
    segment_pack_bits,
    segment_unpack_bits,
    tree_attention,
    tree_positions,
    unpack_bits,
)
from whiflash_sgl.kernels.cpu_backend import CpuBackend
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.kernels.cpu_extension import (
    amx_runs_here, avx2_gemm, build_directory, cpu_kernels, has_avx2, has_avx512, wait_for_build_lock,
)
from whiflash_sgl.kernels.check import Case, main as check_main, random_layout, random_parents, sdpa_oracle
from whiflash_sgl.tree import DraftTree
from whiflash_sgl.verify import accept_greedy, accept_sampled


def random_trees(rng: random.Random, count: int, max_nodes: int = 12, vocab: int = 3) -> list[DraftTree]:
    shapes = ("chain", "wide", "random")
    trees = []
    for i in range(count):
        n = rng.randint(0, max_nodes)
        trees.append(DraftTree(tuple(rng.randrange(vocab) for _ in range(n)),
                               tuple(random_parents(n, shapes[i % 3], rng))))
    return trees


# ---- masks and positions ----------------------------------------------------------------------------------------


def test_tree_masks_and_positions_match_draft_tree():
    rng = random.Random(0)
    for tree in random_trees(rng, 60, max_nodes=20):
        assert torch.equal(build_tree_mask(tree.parents), tree.ancestor_mask())
        assert torch.equal(tree_positions(torch.tensor(tree.parents), 5), tree.positions(5))


def test_batched_masks_and_positions_match_single_trees():
    trees = random_trees(random.Random(1), 9)
    batch = TreeBatch.from_trees(trees)
    masks, _ = batch.ancestor_masks()
    prefixes = [3 * i for i in range(len(trees))]
    for i, tree in enumerate(trees):
        rows = len(tree) + 1
        assert torch.equal(masks[i, :rows, :rows], tree.ancestor_mask())
    assert batch.positions(prefixes).tolist() == [p for t, s in zip(trees, prefixes) for p in t.positions(s).tolist()]


def test_chain_mask_is_causal():
    assert torch.equal(build_tree_mask(range(-1, 6)), torch.ones(8, 8, dtype=torch.bool).tril())
    chains = TreeBatch.from_lists([list(range(-1, n - 1)) for n in (0, 3, 7)])
    tree_layout = chains.attention_layout([5, 0, 11])
    causal = AttentionLayout(tree_layout.qo_indptr, tree_layout.kv_indptr)
    for i in range(3):
        assert torch.equal(tree_layout.request_mask(i), causal.request_mask(i))


def test_siblings_never_see_each_other():
    for tree in random_trees(random.Random(2), 30, max_nodes=16):
        mask = build_tree_mask(tree.parents)
        for i, p in enumerate(tree.parents):
            for j in tree.children(p):
                if j != i:
                    assert not mask[i + 1, j + 1] and not mask[j + 1, i + 1]


def test_verify_layout_sees_whole_prefix_then_the_tree():
    tree = DraftTree(tokens=(10, 11, 12), parents=(-1, -1, 0))
    layout = TreeBatch.from_trees([tree]).attention_layout([4])
    dense = layout.request_mask(0)
    assert dense.shape == (4, 8) and dense[:, :4].all()
    assert torch.equal(dense[:, 4:], tree.ancestor_mask())


def test_bad_parents_are_rejected():
    with pytest.raises(ValueError, match="parent"):
        build_tree_mask([0])
    with pytest.raises(ValueError, match="parent"):
        TreeBatch.from_lists([[-1], [-1, 2, 0]])


# ---- bit packing ------------------------------------------------------------------------------------------------


def test_pack_bits_is_numpy_little_endian_and_round_trips():
    gen = torch.Generator().manual_seed(0)
    for n in (0, 1, 7, 8, 9, 100):
        bits = torch.rand(n, generator=gen) < 0.5
        packed = pack_bits(bits)
        assert packed.tolist() == np.packbits(bits.numpy(), bitorder="little").tolist()
        assert torch.equal(unpack_bits(packed, n), bits)
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool)).tolist() == [0b11001101]


def test_segment_packing_aligns_each_request_to_a_byte_and_round_trips():
    lengths = [4, 3, 0, 11, 16]
    indptr = torch.tensor([0, *np.cumsum(lengths)])
    bits = torch.rand(int(indptr[-1]), generator=torch.Generator().manual_seed(1)) < 0.5
    packed, byte_indptr = segment_pack_bits(bits, indptr)
    expected = [np.packbits(bits[indptr[i] : indptr[i + 1]].numpy(), bitorder="little") for i in range(len(lengths))]
    assert packed.tolist() == np.concatenate(expected).tolist()
    assert byte_indptr.tolist() == [0, 1, 2, 2, 4, 6]
    assert torch.equal(segment_unpack_bits(packed, byte_indptr, indptr), bits)


def test_layout_round_trips_through_its_packed_mask():
    layout = random_layout(Case("t", "random", (0, 20), (0, 40), 2, 1), 5, random.Random(3), torch.device("cpu"))
    packed, byte_indptr = layout.packed_mask()
    again = AttentionLayout.from_packed(layout.qo_indptr, layout.kv_indptr, packed, byte_indptr)
    assert torch.equal(again.mask, layout.mask) and torch.equal(again.mask_indptr, layout.mask_indptr)


# ---- attention ---------------------------------------------------------------------------------------------------

ATTENTION_CASES = [
    Case("gqa-random", "random", (0, 16), (0, 48), 8, 2),
    Case("mha-wide", "wide", (4, 16), (1, 32), 4, 4),
    Case("chains", "chain", (1, 9), (0, 20), 6, 3),
    Case("long-prefix", "random", (4, 12), (600, 1200), 4, 1),
    Case("causal", "chain", (5, 5), (0, 30), 4, 2, causal=True),
    Case("wide-group", "random", (1, 6), (20, 60), 16, 1),  # more query heads per KV head than one pass sums
    Case("multi-query", "random", (1, 6), (20, 60), 40, 1),  # a row's queries over several AMX tiles
    Case("big-trees", "random", (60, 90), (70, 200), 6, 2),  # a request's rows over several work items
    Case("causal-chunks", "chain", (70, 70), (0, 100), 6, 2, causal=True),
]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: c.name)
def test_reference_matches_per_request_sdpa(case):
    rng = random.Random(hash(case.name) % 1000)
    layout = random_layout(case, 5, rng, torch.device("cpu"))
    if not case.causal and case.shape != "chain":
        assert (layout.q_lens == 1).any()  # random_layout plants one request whose tree is empty
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(int(layout.qo_indptr[-1]), case.num_qo_heads, 16, generator=gen)
    k = torch.randn(int(layout.kv_indptr[-1]), case.num_kv_heads, 16, generator=gen)
    v = torch.randn(int(layout.kv_indptr[-1]), case.num_kv_heads, 16, generator=gen)
    expected = sdpa_oracle(q, k, v, layout, 0.25)
    plan = ReferenceBackend().plan(layout, num_qo_heads=case.num_qo_heads, num_kv_heads=case.num_kv_heads,
                                   head_dim=16, scale=0.25, dtype=torch.float32)
    torch.testing.assert_close(plan.run(q, k, v), expected, atol=1e-5, rtol=1e-5)
    # a plan serves every layer of a forward
    torch.testing.assert_close(plan.run(2 * q, k, v), sdpa_oracle(2 * q, k, v, layout, 0.25), atol=1e-5, rtol=1e-5)
    bf16 = ragged_tree_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), layout, 0.25)
    torch.testing.assert_close(bf16.float(), expected, atol=5e-2, rtol=0)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "masked"])
def test_a_prefill_chunk_beside_decode_rows_and_trees_matches_per_request_sdpa(causal):
    """What a batched round hands the plan: a long prefill chunk (more rows than requests share a padded call with),
    decode rows and small trees, over prefixes from empty to hundreds of keys (several padding groups)."""
    chunk = TreeBatch.from_lists([list(range(-1, 199))]).attention_layout([0])  # 200 rows, causal, no prefix
    others = TreeBatch.from_lists([[], [-1, 0, 0], [], [-1, 0, 1]]).attention_layout([37, 300, 700, 5])
    masks = [chunk.request_mask(0)] + [others.request_mask(i) for i in range(4)]
    layout = AttentionLayout.from_request_masks(masks)
    if causal:
        layout = AttentionLayout(layout.qo_indptr, layout.kv_indptr)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(int(layout.qo_indptr[-1]), 4, 16, generator=gen)
    k, v = (torch.randn(int(layout.kv_indptr[-1]), 2, 16, generator=gen) for _ in range(2))
    torch.testing.assert_close(ragged_tree_attention(q, k, v, layout, 0.25), sdpa_oracle(q, k, v, layout, 0.25),
                               atol=1e-5, rtol=1e-5)


def test_single_request_entry_point_agrees_with_the_ragged_reference():
    tree = DraftTree(tokens=(1, 2, 3, 4), parents=(-1, -1, 0, 2))
    layout = TreeBatch.from_trees([tree]).attention_layout([6])
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(5, 4, 8, generator=gen)
    k, v = torch.randn(11, 2, 8, generator=gen), torch.randn(11, 2, 8, generator=gen)
    def hf(x):  # [rows, H, D] -> [1, H, rows, D]
        return x.transpose(0, 1)[None]

    single = tree_attention(hf(q), hf(k), hf(v), layout.request_mask(0)[None, None], 0.3)[0]
    torch.testing.assert_close(single, ragged_tree_attention(q, k, v, layout, 0.3), atol=1e-6, rtol=1e-6)
    causal = tree_attention(hf(q), hf(k), hf(v), None, 0.3)[0]
    causal_layout = AttentionLayout(layout.qo_indptr, layout.kv_indptr)
    torch.testing.assert_close(causal, ragged_tree_attention(q, k, v, causal_layout, 0.3), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_rows_that_see_nothing_give_zeros(backend):
    if backend not in available_backends():
        pytest.skip("needs an AVX-512 CPU and a compiler")
    masks = [torch.tensor([[True, False], [False, False]]), torch.ones(1, 3, dtype=torch.bool)]
    layout = AttentionLayout.from_request_masks(masks)
    plan = get_backend(backend, "cpu", 16).plan(layout, num_qo_heads=2, num_kv_heads=1, head_dim=16, scale=1.0,
                                                dtype=torch.float32)
    out = plan.run(torch.randn(3, 2, 16), torch.randn(5, 1, 16), torch.randn(5, 1, 16))
    assert torch.isfinite(out).all() and not out[1].any() and out[0].any()


def test_layout_validation_errors():
    with pytest.raises(ValueError, match="flat bool"):
        AttentionLayout(torch.tensor([0, 2]), torch.tensor([0, 3]), torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask_indptr"):
        mask = torch.ones(2, dtype=torch.bool)
        AttentionLayout(torch.tensor([0, 1]), torch.tensor([0, 2]), mask, mask_indptr=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="kv_len >= q_len"):
        AttentionLayout(torch.tensor([0, 3]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="multiple"):
        ReferenceBackend().plan(AttentionLayout(torch.tensor([0, 1]), torch.tensor([0, 1])), num_qo_heads=3,
                                num_kv_heads=2, head_dim=8, scale=1.0, dtype=torch.float32)


needs_cpu_kernel = pytest.mark.skipif("cpu" not in available_backends(), reason="needs an AVX-512 CPU and a compiler")
needs_amx = pytest.mark.skipif(not amx_runs_here(), reason="needs a CPU with AMX and a compiler")


@needs_cpu_kernel
@pytest.mark.parametrize("bf16", [False, pytest.param(True, marks=needs_amx)], ids=["float32", "bf16-products"])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: c.name)
def test_the_cpu_kernel_matches_per_request_sdpa_and_gives_each_row_alone_the_same_bits(case, bf16):
    """Paged (keys scattered over a larger pool through ``kv_indices``), every case's masks; a request run on its
    own, and each of its rows on its own with the keys that row sees (a tree row as a decode row would), give bit for
    bit what the batch gave. In bf16 products (AMX) too, where the outputs are SDPA's to bf16 precision."""
    rng = random.Random(hash(case.name) % 1000)
    layout = random_layout(case, 5, rng, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    total_q, total_kv = int(layout.qo_indptr[-1]), int(layout.kv_indptr[-1])
    q = torch.randn(total_q, case.num_qo_heads, 16, generator=gen)
    k, v = (torch.randn(total_kv, case.num_kv_heads, 16, generator=gen) for _ in range(2))
    rows = torch.randperm(3 * total_kv, generator=gen)[:total_kv]  # where each key lives in the pool
    pool_k, pool_v = (torch.zeros(3 * total_kv, case.num_kv_heads, 16) for _ in range(2))
    pool_k[rows], pool_v[rows] = k, v
    paged = AttentionLayout(layout.qo_indptr, layout.kv_indptr, layout.mask, kv_indices=rows)
    heads = dict(num_qo_heads=case.num_qo_heads, num_kv_heads=case.num_kv_heads, head_dim=16, scale=0.25,
                 dtype=torch.float32)
    backend = CpuBackend(bf16)
    out = backend.plan(paged, **heads).run(q, pool_k, pool_v)
    tolerance = 3e-2 if bf16 else 1e-5
    torch.testing.assert_close(out, sdpa_oracle(q, k, v, layout, 0.25), atol=tolerance, rtol=tolerance)
    for i in range(layout.batch_size):
        q0, q1 = int(layout.qo_indptr[i]), int(layout.qo_indptr[i + 1])
        keys = rows[int(layout.kv_indptr[i]) : int(layout.kv_indptr[i + 1])]
        mask = layout.request_mask(i)
        alone = AttentionLayout.from_request_masks([mask])
        alone = AttentionLayout(alone.qo_indptr, alone.kv_indptr, alone.mask, kv_indices=keys)
        assert torch.equal(backend.plan(alone, **heads).run(q[q0:q1], pool_k, pool_v), out[q0:q1])
        for r in range(q1 - q0):
            sees = keys[mask[r]]
            row = AttentionLayout(torch.tensor([0, 1]), torch.tensor([0, len(sees)]), kv_indices=sees)
            assert torch.equal(backend.plan(row, **heads).run(q[q0 + r : q0 + r + 1], pool_k, pool_v),
                               out[q0 + r : q0 + r + 1])


# ---- backends ----------------------------------------------------------------------------------------------------


def test_backend_selection_and_errors(monkeypatch):
    assert isinstance(get_backend("reference"), ReferenceBackend)
    assert "reference" in available_backends()
    with pytest.raises(ValueError, match="auto, reference, flashinfer"):
        get_backend("triton")
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # as if flashinfer were not installed
    assert available_backends() == ["reference"] + (["cpu"] if cpu_kernels() is not None else [])
    assert isinstance(get_backend("auto"), ReferenceBackend)
    assert isinstance(get_backend("auto", "cpu", head_dim=8), ReferenceBackend)  # the CPU kernel needs 16k
    if cpu_kernels() is not None:
        assert isinstance(get_backend("auto", "cpu", head_dim=64), CpuBackend)
        with pytest.raises(BackendUnavailableError, match="multiple of 16, not 8"):
            get_backend("cpu", head_dim=8)
        if amx_runs_here():
            assert get_backend("cpu", head_dim=64, bf16_products=True).bf16_products
        else:
            with pytest.raises(BackendUnavailableError, match="need a CPU with AMX"):
                get_backend("cpu", head_dim=64, bf16_products=True)
    with pytest.raises(BackendUnavailableError, match="pip install flashinfer-python"):
        get_backend("flashinfer")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_flashinfer_without_cuda_says_so():
    with pytest.raises(BackendUnavailableError, match="pip install flashinfer-python|CUDA"):
        get_backend("flashinfer")


@pytest.mark.skipif("flashinfer" not in available_backends(), reason="needs CUDA and flashinfer")
def test_flashinfer_matches_oracle():
    layout = random_layout(ATTENTION_CASES[0], 6, random.Random(5), torch.device("cuda"))
    q = torch.randn(int(layout.qo_indptr[-1]), 8, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(int(layout.kv_indptr[-1]), 2, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    plan = get_backend("flashinfer").plan(layout, num_qo_heads=8, num_kv_heads=2, head_dim=128, scale=0.1,
                                          dtype=torch.bfloat16)
    torch.testing.assert_close(plan.run(q, k, v).float(), sdpa_oracle(q, k, v, layout, 0.1), atol=5e-2, rtol=0)


def test_self_check_passes_on_this_machine(capsys):
    assert check_main(["--device", "cpu", "--repeats", "1"]) == 0
    assert "all checks passed" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="needs a C++ compiler")
def test_the_kernels_this_cpu_can_run_build_and_load():
    # a build that fails falls back to torch with a warning, and the kernel tests then skip: a source that does not
    # compile or link here (an AVX-512 module missing a symbol once did) must fail a test instead
    assert (cpu_kernels() is not None) == has_avx512()
    assert (avx2_gemm() is not None) == has_avx2()


def test_each_checkout_builds_the_cpu_kernels_in_a_folder_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    here, there = build_directory(Path("/a/whiflash_sgl/csrc")), build_directory(Path("/b/whiflash_sgl/csrc"))
    assert here != there and here.parent == there.parent == tmp_path
    assert build_directory(Path("/a/whiflash_sgl/csrc")) == here


def test_a_build_lock_left_behind_is_an_error_that_names_it_and_one_released_is_waited_for(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    with pytest.raises(WhiFlashError, match=f"delete {lock}"):
        wait_for_build_lock(tmp_path, timeout=0.05, poll=0.01)
    threading.Timer(0.05, lock.unlink).start()  # another process's build ends
    wait_for_build_lock(tmp_path, timeout=10.0, poll=0.01)
    assert not lock.exists()


# ---- acceptance --------------------------------------------------------------------------------------------------


def test_batched_greedy_acceptance_equals_single_requests():
    rng = random.Random(6)
    gen = torch.Generator().manual_seed(6)
    for _ in range(20):
        trees = random_trees(rng, 8, max_nodes=14, vocab=3)  # small vocab: long paths and duplicate siblings
        batch = TreeBatch.from_trees(trees)
        logits = torch.randn(int(batch.qo_indptr[-1]), 3, generator=gen)
        got = accept_greedy_batch(batch, logits).tolist()
        rows = batch.qo_indptr.tolist()
        assert got == [accept_greedy(t, logits[rows[i] : rows[i + 1]]) for i, t in enumerate(trees)]


def _exact_outcome_distribution(tree: DraftTree, probs: torch.Tensor) -> dict[tuple, float]:
    """P(accepted path, emitted token) under the deterministic-candidate rule, by enumeration."""
    out: dict[tuple, float] = {}

    def walk(node: int, path: tuple, mass: float) -> None:
        p = probs[node + 1].double()
        first_child = {}
        for c in tree.children(node):
            first_child.setdefault(tree.tokens[c], c)
        for token in range(p.numel()):
            if token in first_child:
                walk(first_child[token], path + (first_child[token],), mass * float(p[token]))
            elif p[token] > 0:
                out[(path, token)] = mass * float(p[token])

    walk(-1, (), 1.0)
    return out


def _outcome(path: list[int], bonus: int) -> tuple:
    return tuple(path), bonus


def _goodness_of_fit(samples: list[tuple], exact: dict[tuple, float]) -> float:
    counts = Counter(samples)
    assert set(counts) <= set(exact)
    keys = sorted(exact, key=exact.get, reverse=True)
    observed = np.array([counts[k] for k in keys], dtype=float)
    expected = np.array([exact[k] for k in keys])
    expected *= len(samples) / expected.sum()  # float32 probabilities sum to 1 only within ~1e-7
    # pool the rare outcomes so every bin expects at least 5 draws
    rare = expected < 5
    observed = np.append(observed[~rare], observed[rare].sum())
    expected = np.append(expected[~rare], expected[rare].sum())
    keep = expected > 0
    return stats.chisquare(observed[keep], expected[keep]).pvalue


def test_batched_sampling_has_the_single_request_distribution():
    trees = [
        DraftTree(tokens=(0, 1, 0, 2, 3, 1), parents=(-1, -1, -1, 0, 3, 1)),  # duplicate sibling token 0
        DraftTree.chain([2, 2, 1]),
        DraftTree(),
    ]
    gen = torch.Generator().manual_seed(7)
    probs = []
    for tree in trees:
        p = torch.rand(len(tree) + 1, 4, generator=gen) + 0.05
        p[:, 3] = 0.0  # a token the target never emits, as top-k / top-p leave behind
        probs.append(p / p.sum(-1, keepdim=True))
    copies = 3000
    batch = TreeBatch.from_trees(trees * copies)
    batched = accept_sampled_batch(batch, torch.cat(probs * copies), torch.Generator().manual_seed(8)).tolist()
    single_gen = torch.Generator().manual_seed(9)
    for i, (tree, p) in enumerate(zip(trees, probs)):
        exact = _exact_outcome_distribution(tree, p)
        assert abs(sum(exact.values()) - 1) < 1e-6
        single = [_outcome(*accept_sampled(tree, p, single_gen)) for _ in range(copies)]
        ours = [_outcome(*o) for o in batched[i :: len(trees)]]
        assert _goodness_of_fit(single, exact) > 1e-3
        assert _goodness_of_fit(ours, exact) > 1e-3
        table = [[Counter(s)[k] for k in exact] for s in (single, ours)]
        table = np.array(table)[:, np.array(table).sum(0) > 0]
        assert stats.chi2_contingency(table).pvalue > 1e-3


def test_sampled_acceptance_is_reproducible_with_a_seeded_generator():
    trees = random_trees(random.Random(10), 6)
    batch = TreeBatch.from_trees(trees)
    probs = torch.softmax(torch.randn(int(batch.qo_indptr[-1]), 3, generator=torch.Generator().manual_seed(0)), -1)
    first = accept_sampled_batch(batch, probs, torch.Generator().manual_seed(11)).tolist()
    assert first == accept_sampled_batch(batch, probs, torch.Generator().manual_seed(11)).tolist()
