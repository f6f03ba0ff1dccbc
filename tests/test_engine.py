"""The engine end to end on a tiny real model: lossless greedy output, stop conditions, streaming."""

from __future__ import annotations

import copy

import pytest
import torch

from whiflash_sgl.drafters.base import Drafter, SequenceState
from whiflash_sgl.drafters.ngram import NgramDrafter
from whiflash_sgl.engine import SpeculativeEngine
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.methods import make_method
from whiflash_sgl.sampling import SamplingParams
from whiflash_sgl.cpu_linears import (SMALL_ROWS, InvariantLinear, PackedLinear, RowAdaptiveLinear,
                                      bf16_products_run_here, drafter_linears)
from whiflash_sgl.kernels.cpu_extension import avx2_gemm, cpu_kernels, float32_gemm, has_avx512
from whiflash_sgl.target import Target
from whiflash_sgl.tree import DraftTree


class KnownContinuationDrafter(Drafter):
    """Proposes a tree whose *second* branch holds the true continuation (known from a vanilla run), below a
    decoy branch, with wrong tokens mixed in deeper down: acceptance goes through non-contiguous rows."""

    name = "known"

    def __init__(self, full_sequence: list[int], vocab_size: int, depth: int = 4):
        self.full, self.vocab, self.depth = full_sequence, vocab_size, depth

    def propose(self, state: SequenceState, max_depth: int) -> DraftTree:
        n = len(state.tokens)
        truth = self.full[n : n + min(self.depth, max_depth)]
        if not truth:
            return DraftTree()
        decoy = [(t + 1) % self.vocab for t in truth]
        wrong_tail = truth[:2] + [(truth[-1] + 7) % self.vocab]
        return DraftTree.from_paths([decoy, truth, wrong_tail])


def _vanilla(target, prompt_ids, n=40):
    return SpeculativeEngine(target).generate(prompt_ids, n)


def test_vanilla_equals_hf_generate(tiny_target, prompt_ids):
    ours = _vanilla(tiny_target, prompt_ids)
    hf = make_method("hf-generate", tiny_target).generate(prompt_ids, 40, SamplingParams(), 0)
    assert ours.tokens == hf.tokens
    assert len(ours.tokens) == 40 and ours.tau == 1.0 and ours.rounds == 39


def test_captured_features_are_hfs_hidden_states(tiny_target, prompt_ids):
    """The capture hooks keep each named layer's input and, past the last layer, the final norm's output: HF's
    ``hidden_states`` at those indices, in the order asked; a forward without capture keeps none."""
    last = tiny_target.config.num_hidden_layers
    with torch.no_grad():
        expected = tiny_target.model(torch.tensor([prompt_ids]), output_hidden_states=True).hidden_states
    try:
        tiny_target.capture_layers = (last, 0, 1)
        hidden = tiny_target.prefill(prompt_ids).hidden
        for column, index in enumerate((last, 0, 1)):
            torch.testing.assert_close(hidden[:, column], expected[index][0], atol=1e-4, rtol=1e-4)
        tiny_target.capture_layers = ()
        assert tiny_target.prefill(prompt_ids).hidden is None
    finally:
        tiny_target.capture_layers = ()


@pytest.mark.parametrize("width", [1, 3])
def test_ngram_is_lossless_and_accepts(looping_target, prompt_ids, width):
    reference = _vanilla(looping_target, prompt_ids, 60)
    result = SpeculativeEngine(looping_target, NgramDrafter(width=width, min_ngram=1)).generate(prompt_ids, 60)
    assert result.tokens == reference.tokens
    assert result.drafted > 0 and sum(result.accept_lengths) > 0  # the draft path really ran
    assert result.rounds < reference.rounds


def test_tree_with_scattered_accepted_path_is_lossless(tiny_target, prompt_ids):
    reference = _vanilla(tiny_target, prompt_ids, 48)
    drafter = KnownContinuationDrafter(list(prompt_ids) + reference.tokens, len(tiny_target.tokenizer))
    result = SpeculativeEngine(tiny_target, drafter).generate(prompt_ids, 48)
    assert result.tokens == reference.tokens
    assert result.tau > 3.0  # the true branch (rows after a decoy) was accepted most rounds


def test_max_new_tokens_is_exact_inside_an_accepted_draft(tiny_target, prompt_ids):
    reference = _vanilla(tiny_target, prompt_ids, 48)
    drafter = KnownContinuationDrafter(list(prompt_ids) + reference.tokens, len(tiny_target.tokenizer), depth=6)
    for n in (1, 2, 5, 13):
        result = SpeculativeEngine(tiny_target, drafter).generate(prompt_ids, n)
        assert result.tokens == reference.tokens[:n] and result.finish_reason == "length"


def test_eos_inside_an_accepted_draft_stops_there(tiny_target, prompt_ids, monkeypatch):
    reference = _vanilla(tiny_target, prompt_ids, 48)
    eos = reference.tokens[9]
    cut = reference.tokens.index(eos)
    monkeypatch.setattr(tiny_target, "eos_token_ids", frozenset({eos}))
    drafter = KnownContinuationDrafter(list(prompt_ids) + reference.tokens, len(tiny_target.tokenizer), depth=6)
    result = SpeculativeEngine(tiny_target, drafter).generate(prompt_ids, 48)
    assert result.tokens == reference.tokens[: cut + 1]
    assert result.finish_reason == "eos"


def test_stop_string_cuts_text_and_tokens(tiny_target, prompt_ids):
    reference = _vanilla(tiny_target, prompt_ids, 48)
    stop = reference.text[12:16]
    assert stop.strip(), "the tiny model's output should have text to stop on"
    result = SpeculativeEngine(tiny_target, NgramDrafter(min_ngram=1)).generate(prompt_ids, 48, stop=[stop])
    assert result.finish_reason == "stop"
    assert result.text == reference.text[: reference.text.find(stop)]
    assert result.tokens == reference.tokens[: len(result.tokens)]


def test_streamed_pieces_add_up_to_the_text(tiny_target, prompt_ids):
    pieces: list[str] = []
    result = SpeculativeEngine(tiny_target, NgramDrafter(min_ngram=1)).generate(prompt_ids, 40, on_text=pieces.append)
    assert "".join(pieces) == result.text and len(pieces) > 1


class TargetChainDrafter(Drafter):
    """Drafts a chain with the target itself (full recompute, no cache): the best drafter there is. Under the keyed
    rule it draws with the request's keyed noise, the row at position p keyed by p as the engine keys it."""

    name = "self"

    def __init__(self, target: Target, depth: int = 4):
        self.target, self.depth = target, depth

    @torch.inference_mode()
    def propose(self, state: SequenceState, max_depth: int) -> DraftTree:
        tokens = list(state.tokens)
        for _ in range(min(self.depth, max_depth)):
            logits = self.target.model(torch.tensor([tokens])).logits[0, -1:].float()
            sampler = state.sampler
            tokens.append(sampler.sample(logits, [len(tokens) - 1])[0] if sampler else int(logits.argmax(-1)))
        return DraftTree.chain(tokens[len(state.tokens):])


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_keyed_rule_accepts_every_coupled_draft_of_the_target_itself(tiny_target, prompt_ids, temperature):
    """A drafter with the target's own distribution that draws with the request's keyed noise guesses every keyed
    sample: all drafts are accepted and the text is vanilla's for that seed. The rejection rule, drawing afresh,
    accepts only some of the same drafts."""
    params = SamplingParams(temperature=temperature, top_p=0.9)
    reference = SpeculativeEngine(tiny_target, None, params, seed=99).generate(prompt_ids, 41)
    keyed = SpeculativeEngine(tiny_target, TargetChainDrafter(tiny_target), params, seed=99).generate(prompt_ids, 41)
    assert keyed.tokens == reference.tokens
    assert keyed.accept_lengths == [4] * 8 and keyed.rounds == 8
    rejection = SamplingParams(temperature=temperature, top_p=0.9, rule="rejection")
    drawn = SpeculativeEngine(tiny_target, TargetChainDrafter(tiny_target), rejection, seed=99).generate(prompt_ids, 41)
    assert sum(drawn.accept_lengths) < sum(keyed.accept_lengths)


def test_sampling_is_reproducible_with_a_seed(tiny_target, prompt_ids):
    params = SamplingParams(temperature=0.8, top_p=0.95, top_k=50)
    runs = [SpeculativeEngine(tiny_target, NgramDrafter(min_ngram=1), params, seed=s).generate(prompt_ids, 40)
            for s in (1, 1, 2)]
    assert runs[0].tokens == runs[1].tokens
    assert runs[0].tokens != runs[2].tokens


def test_attention_through_the_kernels_api_matches_the_direct_path(tiny_target, prompt_ids, verify_logits):
    """Verification planned through ``whiflash_sgl.kernels`` (the engine's default) gives the direct path's logits on
    a branching tree, and the same greedy output with a tree drafter."""
    target = tiny_target
    tree = DraftTree.from_paths([[5, 6, 7], [5, 8], [9]])
    logits = {}
    for path in ("direct", "auto"):  # auto is the reference backend on a CPU
        target.set_attention(path)
        logits[path] = verify_logits(target, prompt_ids[:-1], prompt_ids[-1], tree)
    torch.testing.assert_close(logits["auto"], logits["direct"], rtol=1e-5, atol=1e-5)
    full = _vanilla(target, prompt_ids).tokens
    outputs = {}
    for path in ("direct", "reference"):
        method = make_method(f"vanilla@{path}", target)
        method.drafter = KnownContinuationDrafter(prompt_ids + full, len(target.tokenizer))
        outputs[path] = method.generate(prompt_ids, 40, SamplingParams(), 0)
        assert target.attention == "auto"  # the override is only for that method's runs
    assert outputs["direct"].tokens == outputs["reference"].tokens == full
    assert outputs["reference"].tau > 1


def test_unknown_attention_path_is_a_clear_error(tiny_target):
    with pytest.raises(WhiFlashError, match="unknown attention path 'fast'.*direct"):
        make_method("vanilla@fast", tiny_target)
    with pytest.raises(WhiFlashError, match="drop '@direct'"):
        make_method("hf-generate@direct", tiny_target)


def test_a_packed_linear_gives_the_dense_product_for_one_row_and_for_many():
    linear = torch.nn.Linear(16, 8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for x in (torch.randn(1, 1, 16, generator=gen), torch.randn(1, 5, 16, generator=gen)):
            torch.testing.assert_close(PackedLinear(linear)(x), linear(x), rtol=1e-5, atol=1e-5)


needs_float32_gemm = pytest.mark.skipif(float32_gemm() is None, reason="needs AVX2 and a C++ compiler")
needs_bf16_products = pytest.mark.skipif(not bf16_products_run_here(),
                                         reason="needs a CPU with AMX or AVX512-BF16 and a C++ compiler")


@needs_float32_gemm
def test_loading_picks_the_invariant_kernel_on_a_cpu_that_runs_it(tiny_tokenizer, make_model, prompt_ids):
    """``pack=None`` (what ``Target.load`` passes) swaps every linear, the LM head included, for the kernel; the
    drafters' dense LM head stays, and greedy output is the dense model's."""
    dense = Target(make_model(len(tiny_tokenizer)), tiny_tokenizer)
    fast = Target(make_model(len(tiny_tokenizer)), tiny_tokenizer, pack=None)
    assert isinstance(fast.model.lm_head, InvariantLinear) and isinstance(fast.lm_head, torch.nn.Linear)
    assert not any(isinstance(m, torch.nn.Linear) for m in fast.model.model.modules())
    assert _vanilla(fast, prompt_ids).tokens == _vanilla(dense, prompt_ids).tokens


@pytest.mark.parametrize("bf16_products", [
    pytest.param(False, marks=needs_float32_gemm), pytest.param(True, marks=needs_bf16_products),
], ids=["float32", "bf16"])
def test_the_invariant_linear_gives_its_product_and_each_row_whatever_the_batch(bf16_products):
    """The target's kernels (float32: this CPU's build, AVX-512 or AVX2): the product (float32: the dense one; bf16:
    of the bf16-rounded rows and weights, summed in float32), up to float32 rounding, for widths that are and are
    not a multiple of the panels and of 32 input features, with a bias; each row bit for bit the same alone, in a
    batch of any size up to 40 (every float32 and AVX512-BF16 tile shape, or one to three AMX row tiles, the last cut
    to the rows left) and at any place in it."""
    gen = torch.Generator().manual_seed(0)
    for out_features in (48, 37):
        linear = torch.nn.Linear(72, out_features)
        kernel = InvariantLinear(linear, cpu_kernels() if bf16_products else float32_gemm(), bf16_products)
        x = torch.randn(40, 72, generator=gen)
        with torch.no_grad():
            alone = torch.cat([kernel(x[i : i + 1]) for i in range(len(x))])
            if bf16_products:
                rounded = torch.nn.functional.linear(x.bfloat16().double(), linear.weight.bfloat16().double(),
                                                     linear.bias.double())
                torch.testing.assert_close(alone.double(), rounded, rtol=1e-5, atol=1e-5)
                assert (alone - linear(x)).abs().max() > 1e-4  # bf16 products: not the float32 product
            else:
                torch.testing.assert_close(alone, linear(x), rtol=1e-5, atol=1e-5)
            for rows in range(1, len(x) + 1):
                assert torch.equal(kernel(x[None, :rows])[0], alone[:rows])
                assert torch.equal(kernel(x[len(x) - rows :]), alone[len(x) - rows :])


@pytest.mark.skipif(cpu_kernels() is None or avx2_gemm() is None, reason="needs an AVX-512 CPU and a C++ compiler")
def test_the_avx2_and_avx512_builds_give_the_same_bits():
    """A request served on an AVX2 host and on an AVX-512 one gets the same float32 linears, whatever the rows."""
    gen = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(72, 37)
    x = torch.randn(13, 72, generator=gen)
    with torch.no_grad():
        assert torch.equal(InvariantLinear(linear, cpu_kernels())(x), InvariantLinear(linear, avx2_gemm())(x))


@needs_bf16_products
def test_matmul_bfloat16_puts_every_linear_on_the_bf16_kernel(tiny_tokenizer, make_model, prompt_ids):
    """The drafters' dense LM head stays; "auto" picks bf16 products where they run; vanilla and a drafter give one
    greedy text, the bf16 target's own."""
    target = Target(make_model(len(tiny_tokenizer)), tiny_tokenizer, matmul="bfloat16")
    assert target.matmul == "bfloat16" and isinstance(target.lm_head, torch.nn.Linear)
    kernels = [m for m in target.model.modules() if isinstance(m, InvariantLinear)]
    assert kernels and all(m.bf16_products for m in kernels)
    assert not any(isinstance(m, torch.nn.Linear) for m in target.model.model.modules())
    assert Target(make_model(len(tiny_tokenizer)), tiny_tokenizer, matmul="auto").matmul == "bfloat16"
    expected = _vanilla(target, prompt_ids).tokens
    assert expected != _vanilla(Target(make_model(len(tiny_tokenizer)), tiny_tokenizer), prompt_ids).tokens
    method = make_method("vanilla", target)
    method.drafter = KnownContinuationDrafter(prompt_ids + expected, len(tiny_tokenizer))
    assert method.generate(prompt_ids, 40, SamplingParams(), 0).tokens == expected


@needs_bf16_products
def test_bf16_drafters_run_their_linears_on_the_bf16_kernel_in_bf16():
    """``drafter_linears`` swaps a bf16 module's linears (or a linear itself) for the kernel; outputs stay bf16 and
    are the bf16 product up to bf16 rounding; float32 modules stay as they are."""
    gen = torch.Generator().manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(64, 40), torch.nn.SiLU(), torch.nn.Linear(40, 24)).to(torch.bfloat16)
    dense = copy.deepcopy(block)
    assert drafter_linears(block) is block and isinstance(block[0], InvariantLinear) and block[2].bf16_products
    assert isinstance(drafter_linears(copy.deepcopy(dense[0])), InvariantLinear)
    float32 = torch.nn.Linear(8, 8)
    assert drafter_linears(float32) is float32
    with torch.no_grad():
        for rows in (1, 5, 33):
            x = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
            out = block(x)
            assert out.dtype == torch.bfloat16
            torch.testing.assert_close(out.float(), dense(x).float(), rtol=2e-2, atol=2e-2)


@needs_float32_gemm
def test_a_bf16_layer_on_the_float32_kernel_gives_its_product_in_bf16():
    """A bf16 drafter's linear on the float32 kernel (what ``drafter_linears`` picks on an AVX2 CPU): the product
    of its bf16 weights and rows, summed in float32, returned in bf16; ``drafter_linears`` swaps in that kernel, or
    the bf16 one, or leaves the layer to torch on an AVX-512 CPU without AMX or AVX512-BF16."""
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(72, 37).to(torch.bfloat16)
    kernel = InvariantLinear(linear, float32_gemm())
    with torch.no_grad():
        for rows in (1, 5, 33):
            x = torch.randn(rows, 72, generator=gen).to(torch.bfloat16)
            out = kernel(x)
            assert out.dtype == torch.bfloat16
            exact = torch.nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())
            torch.testing.assert_close(out.double(), exact, rtol=1e-2, atol=1e-2)
    swapped = drafter_linears(copy.deepcopy(linear))
    if bf16_products_run_here() or not has_avx512():
        assert isinstance(swapped, InvariantLinear) and swapped.bf16_products == bf16_products_run_here()
    else:
        assert isinstance(swapped, torch.nn.Linear)


def test_matmul_precision_errors_and_the_auto_fallback(tiny_tokenizer, make_model, monkeypatch):
    with pytest.raises(WhiFlashError, match="unknown matmul precision 'int8'.*float32, bfloat16, auto"):
        Target(make_model(len(tiny_tokenizer)), tiny_tokenizer, matmul="int8")
    bf16_model = make_model(len(tiny_tokenizer)).to(torch.bfloat16)
    with pytest.raises(WhiFlashError, match="for a float32 target.*--dtype float32"):
        Target(bf16_model, tiny_tokenizer, matmul="bfloat16")
    monkeypatch.setattr("whiflash_sgl.target.bf16_products_run_here", lambda: False)
    monkeypatch.setattr("whiflash_sgl.target.invariant_linears", lambda model, bf16_products=False: False)
    with pytest.raises(WhiFlashError, match="needs a CPU with AMX or AVX512-BF16.*--matmul float32"):
        Target(make_model(len(tiny_tokenizer)), tiny_tokenizer, matmul="bfloat16")
    assert Target(make_model(len(tiny_tokenizer)), tiny_tokenizer, matmul="auto").matmul == "float32"


def test_without_the_kernel_loading_falls_back_to_torch_linears(tiny_tokenizer, make_model, monkeypatch):
    monkeypatch.setattr("whiflash_sgl.target.invariant_linears", lambda model, bf16_products=False: False)
    monkeypatch.setattr("whiflash_sgl.target.prepacking_pays", lambda model: False)
    target = Target(make_model(len(tiny_tokenizer)), tiny_tokenizer, pack=None)
    assert isinstance(target.model.lm_head, torch.nn.Linear)


def test_a_row_adaptive_linear_gives_the_bf16_product_in_bf16_for_few_rows_and_for_many():
    linear = torch.nn.Linear(16, 8).to(torch.bfloat16)
    adaptive = RowAdaptiveLinear(linear)
    assert adaptive.state_dict().keys() == linear.state_dict().keys()  # the float32 copy is not saved
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for rows in (1, SMALL_ROWS, SMALL_ROWS + 1, 32):
            x = torch.randn(1, rows, 16, generator=gen).to(torch.bfloat16)
            out = adaptive(x)
            assert out.dtype == torch.bfloat16
            exact = torch.nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())
            torch.testing.assert_close(out.double(), exact, rtol=1e-2, atol=1e-2)


def test_prepacked_linears_keep_the_output(tiny_tokenizer, make_model, prompt_ids, verify_logits):
    """oneDNN-prepacked linears (what ``Target.load`` uses on a CPU) give the dense model's logits up to float32
    rounding, the same greedy text for every engine method and for transformers' own generate on the same modules;
    the dense LM head stays available to drafters."""
    dense = Target(make_model(len(tiny_tokenizer)), tiny_tokenizer)
    packed = Target(make_model(len(tiny_tokenizer)), tiny_tokenizer, pack=True)
    assert isinstance(packed.model.lm_head, PackedLinear) and isinstance(packed.lm_head, torch.nn.Linear)
    tree = DraftTree.from_paths([[5, 6, 7], [5, 8]])
    logits = []
    for target in (dense, packed):
        logits.append(verify_logits(target, prompt_ids[:-1], prompt_ids[-1], tree))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    expected = _vanilla(dense, prompt_ids).tokens
    for name in ("vanilla", "ngram", "hf-generate"):
        assert make_method(name, packed).generate(prompt_ids, 40, SamplingParams(), 0).tokens == expected, name
