"""Drafter training end to end on a tiny target: responses, features, and a few optimizer steps that must
raise held-out acceptance above the untrained drafter's."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from whiflash_sgl.drafters.checkpoint import dflash_config, eagle3_config
from whiflash_sgl.drafters.dflash import DFlashModel
from whiflash_sgl.drafters.eagle3 import Eagle3Model
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.target import Target
from whiflash_sgl.train.dflash import DFlashTrainer
from whiflash_sgl.train.dflash import init_from_target as init_dflash
from whiflash_sgl.train.distill_data import FeatureDataset, extract_features, generate_responses
from whiflash_sgl.train.eagle3 import Eagle3Trainer, draft_vocabulary, set_vocabulary
from whiflash_sgl.train.eagle3 import init_from_target as init_eagle3
from whiflash_sgl.train.loop import TrainSettings, train
from whiflash_sgl.train.train_drafter import default_layer_ids

LAYERS = tuple(i + 1 for i in default_layer_ids(6))  # hidden_states indices of the drafters' layers


@pytest.fixture(scope="module")
def looping_dir(tmp_path_factory, tiny_tokenizer, make_model):
    """A 6-layer model with small weights, whose repetitive greedy output is learnable in a few steps."""
    path = tmp_path_factory.mktemp("looping6")
    make_model(len(tiny_tokenizer), num_hidden_layers=6, initializer_range=0.02).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def distill_dir(looping_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("distill")
    prompts = data / "prompts.jsonl"
    words = ["alpha", "beta", "gamma", "delta", "fox", "dog", "json", "code"]
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "category": "chat", "messages": [
        {"role": "user", "content": f"{words[i % 8]} {words[(3 * i) % 8]} {i}"}]}) + "\n" for i in range(72)))
    assert generate_responses(looping_dir, prompts, data / "responses.jsonl", max_new_tokens=24, batch_size=24) == 72
    assert generate_responses(looping_dir, prompts, data / "responses.jsonl", max_new_tokens=24) == 72  # resumes
    extract_features(looping_dir, data / "responses.jsonl", data, LAYERS, shard_sequences=40)
    assert len(list(data.glob("features-*.safetensors"))) == 2
    return data


@pytest.fixture(scope="module")
def dataset(distill_dir):
    return FeatureDataset(distill_dir, LAYERS)


def test_responses_added_after_their_features_are_an_error(distill_dir, looping_dir, tmp_path):
    for f in distill_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    extract_features(looping_dir, tmp_path / "responses.jsonl", tmp_path, LAYERS, shard_sequences=40)  # complete
    row = json.loads((tmp_path / "responses.jsonl").read_text().splitlines()[-1])
    with (tmp_path / "responses.jsonl").open("a") as f:
        f.write(json.dumps({**row, "id": "late"}) + "\n")  # falls into the last shard, which exists
    with pytest.raises(WhiFlashError, match="holds features of 72 sequences but .* has 73 rows"):
        extract_features(looping_dir, tmp_path / "responses.jsonl", tmp_path, LAYERS, shard_sequences=40)


def test_prompts_over_the_cap_are_skipped_and_counted(looping_dir, tmp_path, capsys):
    rows = [{"id": "short", "category": "chat", "messages": [{"role": "user", "content": "fox dog"}]},
            {"id": "long", "category": "chat", "messages": [{"role": "user", "content": "fox dog " * 40}]}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert generate_responses(looping_dir, tmp_path / "prompts.jsonl", tmp_path / "responses.jsonl",
                              max_new_tokens=4, max_prompt_tokens=40) == 1
    assert "skipping 1 prompts longer than 40 tokens" in capsys.readouterr().err
    assert [json.loads(line)["id"] for line in (tmp_path / "responses.jsonl").read_text().splitlines()] == ["short"]


def test_features_equal_a_plain_forward(dataset, looping_dir):
    target = Target.load(str(looping_dir), capture_layers=LAYERS)
    tokens, features, prompt_len = dataset[5]
    out = target.prefill(tokens.tolist())
    torch.testing.assert_close(features.float(), out.hidden, atol=2e-3, rtol=2e-3)  # stored as fp16
    assert 0 < prompt_len < len(tokens)


@pytest.mark.parametrize("kind", ["eagle3", "dflash"])
def test_training_raises_heldout_acceptance(kind, dataset, looping_dir, tmp_path):
    target = Target.load(str(looping_dir), pack=False)  # as train-drafter: gradients flow through the LM head
    target.model.requires_grad_(False)
    embed, head = target.model.get_input_embeddings(), target.model.get_output_embeddings()
    torch.manual_seed(0)
    if kind == "eagle3":
        model = Eagle3Model(eagle3_config(target, 64, default_layer_ids(6)))
        set_vocabulary(model, draft_vocabulary(dataset, 64, target.config.vocab_size))
        init_eagle3(model, target.model)
        draft_ids = model.d2t + torch.arange(64)
        assert torch.equal(model.lm_head.weight, head.weight[draft_ids])
        trainer, metric = Eagle3Trainer(model, embed, steps=3), "tau_chain"
    else:
        mask_id = target.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        model = DFlashModel(dflash_config(target, 1, 4, default_layer_ids(6), mask_id))
        init_dflash(model, target.model)
        assert torch.equal(model.layers[0].mlp.up_proj.weight, target.model.model.layers[-1].mlp.up_proj.weight)
        trainer, metric = DFlashTrainer(model, embed, head, anchors=4), "tau_block"
    settings = TrainSettings(epochs=4, lr=3e-3, batch_sequences=4, eval_every=10, heldout=12)
    result = train(trainer, dataset, tmp_path, settings)
    assert result["steps"] == result["total_steps"] == 60
    assert result["heldout"][metric] > result["heldout_before"][metric] + 0.3, result
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 60 and log[-1]["loss"] < log[0]["loss"]
    assert (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("case", ["eagle3: response outside the draft vocabulary", "eagle3: no response",
                                  "dflash: no response"])
def test_a_sequence_with_nothing_to_learn_gives_a_zero_loss_that_backpropagates(case, dataset, looping_dir):
    """The v4 data held a response of 128 tokens none of which is in EAGLE-3's draft vocabulary (the target
    looping on rare byte tokens); such a sequence still makes a training batch, without gradients."""
    target = Target.load(str(looping_dir), pack=False)
    embed, head = target.model.get_input_embeddings(), target.model.get_output_embeddings()
    tokens, features, prompt_len = dataset[0]
    if case.startswith("eagle3"):
        model = Eagle3Model(eagle3_config(target, 64, default_layer_ids(6)))
        set_vocabulary(model, draft_vocabulary(dataset, 64, target.config.vocab_size))
        trainer = Eagle3Trainer(model, embed, steps=3)
    else:
        model = DFlashModel(dflash_config(target, 1, 4, default_layer_ids(6), 0))
        trainer = DFlashTrainer(model, embed, head, anchors=4)
    if case.endswith("outside the draft vocabulary"):
        outside = sorted(set(range(target.config.vocab_size)) - set((model.d2t + torch.arange(64)).tolist()))[0]
        tokens = tokens.clone()
        tokens[prompt_len:] = outside
    else:
        prompt_len = len(tokens)  # every token is prompt
    loss, _ = trainer.loss((tokens, features, prompt_len))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("layers", range(3, 65))
def test_default_layer_ids_are_distinct_sorted_and_capturable(layers):
    """SGLang captures the input of layer i + 1 for id i, so ids lie in [-1, L - 2]; duplicates break EAGLE3."""
    ids = default_layer_ids(layers)
    assert len(ids) == 3 and ids == sorted(set(ids))
    assert -1 <= ids[0] and ids[-1] <= layers - 2


def test_default_layer_ids_keep_the_committed_drafters_layers():
    assert default_layer_ids(30) == [1, 14, 26]  # SmolLM2-135M's drafters were trained on these
