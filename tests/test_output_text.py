"""A request's output text, decoded a few tokens at a time: the same text, pieces and stop-string cuts as decoding
the whole output every round, for a byte-level tokenizer and a SentencePiece-style one, in any split into rounds."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from whiflash_sgl.output_text import OutputText

TEXT = "Naïve café: 3 × 4 = 12 ✓ — 日本語のテキスト 🙂🚀 done. Then more words follow, café again! 🙂"


@pytest.fixture(scope="module")
def metaspace_tokenizer():
    """SentencePiece-style: a token's leading space is '▁', which decoding drops at the start of a text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([TEXT] * 10, trainers.BpeTrainer(vocab_size=120, special_tokens=["</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


@pytest.fixture(params=["byte_level", "metaspace"])
def tokenizer(request, tiny_tokenizer, metaspace_tokenizer):
    return tiny_tokenizer if request.param == "byte_level" else metaspace_tokenizer


def _rounds(tokens: list[int], seed: int) -> list[list[int]]:
    """``tokens`` split into rounds of 1 to 5, as a speculative engine commits them."""
    rng, out, i = random.Random(seed), [], 0
    while i < len(tokens):
        n = rng.randint(1, 5)
        out.append(tokens[i : i + n])
        i += n
    return out


def _run(tokenizer, tokens: list[int], seed: int, stop=()) -> tuple[OutputText, list[str]]:
    pieces: list[str] = []
    output = OutputText(tokenizer, frozenset(), len(tokens), stop, pieces.append)
    for new in _rounds(tokens, seed):
        output.extend(new)
        if output.finish_reason is not None:
            break
    return output, pieces


@pytest.mark.parametrize("seed", range(5))
def test_pieces_are_the_whole_decode_and_never_a_broken_character(tokenizer, seed):
    tokens = tokenizer.encode(TEXT, add_special_tokens=False)
    full = tokenizer.decode(tokens, skip_special_tokens=True)
    output, pieces = _run(tokenizer, tokens, seed)
    assert output.text == full and "".join(pieces) == full
    assert not any("\ufffd" in piece for piece in pieces)
    assert output.finish_reason == "length"


def test_the_byte_level_text_splits_characters_between_tokens(tiny_tokenizer):
    """What the test above relies on: some token of TEXT ends inside a UTF-8 character."""
    tokens = tiny_tokenizer.encode(TEXT, add_special_tokens=False)
    assert any(tiny_tokenizer.decode(tokens[:n]).endswith("\ufffd") for n in range(1, len(tokens)))


def test_metaspace_decodes_a_window_without_its_leading_space(metaspace_tokenizer):
    """What the context in front of each round's tokens is for."""
    tokens = metaspace_tokenizer.encode(TEXT, add_special_tokens=False)
    cut = next(n for n in range(1, len(tokens)) if metaspace_tokenizer.convert_ids_to_tokens(tokens[n]).startswith("▁"))
    whole, head = metaspace_tokenizer.decode(tokens), metaspace_tokenizer.decode(tokens[:cut])
    assert whole[len(head):] != metaspace_tokenizer.decode(tokens[cut:])


def test_each_round_decodes_a_few_tokens_not_the_whole_output(tiny_tokenizer):
    tokens = tiny_tokenizer.encode(TEXT * 8, add_special_tokens=False)
    decoded = 0

    class Counting:
        def decode(self, ids, **kwargs):
            nonlocal decoded
            decoded += len(ids)
            return tiny_tokenizer.decode(ids, **kwargs)

    output, _ = _run(Counting(), tokens, seed=0)
    assert output.text == tiny_tokenizer.decode(tokens)
    assert decoded < 12 * len(tokens)  # every round's tokens, and the round before's, twice (whole: ~n^2 / 6)


@pytest.mark.parametrize("stop", ["café", "✓", "日本", "🙂", " done", "again! 🙂", "z"])
@pytest.mark.parametrize("seed", range(3))
def test_stop_strings_cut_as_on_the_whole_text(tokenizer, stop, seed):
    tokens = tokenizer.encode(TEXT, add_special_tokens=False)
    full = tokenizer.decode(tokens, skip_special_tokens=True)
    output, pieces = _run(tokenizer, tokens, seed, stop=[stop, "never there"])
    if stop not in full:
        assert output.finish_reason == "length" and output.text == full
        return
    cut = full.find(stop)
    kept = next(n for n in range(1, len(tokens) + 1) if len(tokenizer.decode(tokens[:n])) > cut)
    assert output.finish_reason == "stop"
    assert output.text == full[:cut] == "".join(pieces)
    assert output.tokens == tokens[:kept]


def test_eos_and_length_stop_taking_tokens(tiny_tokenizer):
    tokens = tiny_tokenizer.encode("one two three four", add_special_tokens=False)
    eos = OutputText(tiny_tokenizer, frozenset({tokens[2]}), 100, (), None)
    assert eos.extend(tokens) == 3 and eos.finish_reason == "eos" and eos.tokens == tokens[:3]
    length = OutputText(tiny_tokenizer, frozenset(), 2, (), None)
    assert length.extend(tokens) == 2 and length.finish_reason == "length"
    assert length.text == tiny_tokenizer.decode(tokens[:2])
