"""``whiflash train-drafter``: prompts -> target responses -> target features -> a trained drafter folder.

Every stage writes into ``--data`` and is skipped when its output is there, so an interrupted run resumes; the
training stage keeps its checkpoint and log in ``--data/run-<kind>`` and resumes from it. ``--out`` receives only
the finished drafter (config, bf16 weights, recipe). Both drafters read the same target layers (HF
``hidden_states`` 2, 15 and 27 of SmolLM2's 30 layers: SGLang's EAGLE-3 default, and DFlash layer ids spaced evenly
from 1 to L-4), so one feature set serves both.
"""

from __future__ import annotations

import json
import random
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch

from whiflash_sgl.drafters.checkpoint import dflash_config, eagle3_config, load_drafter_model, save_drafter
from whiflash_sgl.drafters.dflash import DFlashModel
from whiflash_sgl.drafters.eagle3 import Eagle3Model
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.jsonl import read_jsonl
from whiflash_sgl.model_store import resolve_model
from whiflash_sgl.target import Target
from whiflash_sgl.train.dflash import DFlashTrainer
from whiflash_sgl.train.dflash import init_from_target as init_dflash_from_target
from whiflash_sgl.train.distill_data import MAX_PROMPT_TOKENS, FeatureDataset, extract_features, generate_responses
from whiflash_sgl.train.eagle3 import Eagle3Trainer, draft_vocabulary, set_vocabulary
from whiflash_sgl.train.eagle3 import init_from_target as init_eagle3_from_target
from whiflash_sgl.train.loop import TrainSettings, train


def default_layer_ids(num_layers: int) -> list[int]:
    """Target layer ids (SGLang convention: output of layer i, -1 the embeddings) for both drafters: distinct and
    sorted, as SGLang's capture needs. ``[1, L//2 - 1, L - 4]`` from 7 layers on; below that, the three highest
    layers whose output SGLang can capture (it captures the input of layer i + 1, so i <= L - 2)."""
    if num_layers < 3:
        raise WhiFlashError(f"drafters read three target layers; a {num_layers}-layer target has too few")
    ids = [1, num_layers // 2 - 1, num_layers - 4]
    if ids[0] < ids[1] < ids[2]:
        return ids
    top = min(2, num_layers - 2)
    return [top - 2, top - 1, top]


def add_arguments(p) -> None:
    p.add_argument("--kind", choices=("eagle3", "dflash"), required=True)
    p.add_argument("--data", required=True, help="data folder (prompts, responses, features); reused across runs")
    p.add_argument("--out", required=True, help="output drafter folder (config.json + model.safetensors)")
    p.add_argument("--prompts", help="training prompts JSONL (default: build one into --data)")
    p.add_argument("--per-category", type=int, default=1500, help="prompts per category when building them")
    p.add_argument("--sample-per-category", type=int, default=600,
                   help="prompts drawn per category (seeded) for the target to answer")
    p.add_argument("--sample-limit", type=int, help="answer only the first N drawn prompts (categories interleaved)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="length cap of the target's responses")
    p.add_argument("--max-prompt-tokens", type=int, default=MAX_PROMPT_TOKENS, help="longer prompts are not answered")
    p.add_argument("--epochs", type=float, default=8.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--minutes", type=float, help="stop training after this many minutes (then save)")
    p.add_argument("--draft-vocab", type=int, default=8192, help="EAGLE-3 draft vocabulary size")
    p.add_argument("--ttt-steps", type=int, default=4, help="EAGLE-3 unrolled training-time-test steps")
    p.add_argument("--layers", type=int, default=3, help="DFlash draft layers")
    p.add_argument("--block-size", type=int, default=16, help="DFlash block size")
    p.add_argument("--anchors", type=int, default=8, help="DFlash blocks per sequence")
    p.add_argument("--init", help="continue from this drafter folder (its shape and vocabulary) instead of a fresh one")
    p.add_argument("--gamma", type=float, default=7.0, help="DFlash loss decay over block positions")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in float32 (default: bf16 autocast)")
    p.add_argument("--mask-token", default="<empty_output>", help="DFlash mask token (an unused special token)")


def sample_prompts(rows: list[dict], per_category: int, seed: int) -> list[dict]:
    """``per_category`` seeded draws from each category, then shuffled together: any prefix is balanced."""
    rng = random.Random(seed)
    by_category: dict[str, list[dict]] = {}
    for row in rows:
        by_category.setdefault(row["category"], []).append(row)
    chosen = []
    for category in sorted(by_category):
        rng.shuffle(by_category[category])
        chosen += by_category[category][:per_category]
    rng.shuffle(chosen)
    return chosen


def prepare_data(args, target: Target, layers: tuple[int, ...]) -> Path:
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    prompts = Path(args.prompts) if args.prompts else data / "prompts.jsonl"
    if not prompts.exists():
        from whiflash_sgl.train.prompts import build_training_prompts

        counts = build_training_prompts(prompts, per_category=args.per_category, seed=args.seed)
        print(f"built training prompts: {counts}", file=sys.stderr)
    sample = data / "sampled_prompts.jsonl"
    if not sample.exists():
        rows = read_jsonl(prompts)
        chosen = sample_prompts(rows, args.sample_per_category, args.seed)[: args.sample_limit]
        sample.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    model_dir = resolve_model(args.model)
    responses = data / "responses.jsonl"
    generate_responses(model_dir, sample, responses, args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens)
    extract_features(model_dir, responses, data, layers)
    return data


def response_categories(responses: Path) -> dict[str, int]:
    """How many training sequences each prompt category gave (for the recipe)."""
    counts = Counter(row["category"] for row in read_jsonl(responses))
    return dict(sorted(counts.items()))


def new_drafter(args, target: Target, dataset: FeatureDataset, layer_ids: list[int]) -> torch.nn.Module:
    """A fresh drafter of ``args.kind`` shaped by the flags, initialised from the target."""
    if args.kind == "eagle3":
        model = Eagle3Model(eagle3_config(target, args.draft_vocab, layer_ids))
        set_vocabulary(model, draft_vocabulary(dataset, args.draft_vocab, target.config.vocab_size))
        init_eagle3_from_target(model, target.model)
        return model
    mask_id = target.tokenizer.convert_tokens_to_ids(args.mask_token)
    if mask_id is None or mask_id == target.tokenizer.unk_token_id:
        raise WhiFlashError(f"mask token {args.mask_token!r} is not in the target's vocabulary")
    model = DFlashModel(dflash_config(target, args.layers, args.block_size, layer_ids, mask_id))
    init_dflash_from_target(model, target.model)
    return model


def run(args) -> dict:
    started = time.time()
    target = Target.load(args.model, pack=False)  # training backpropagates through the target's LM head
    target.model.requires_grad_(False)
    layer_ids = default_layer_ids(target.config.num_hidden_layers)
    features = tuple(i + 1 for i in layer_ids)
    dataset = FeatureDataset(prepare_data(args, target, features), features)
    if len(dataset) < 64:
        raise WhiFlashError(f"only {len(dataset)} training sequences in {args.data}; need at least 64")
    embed, lm_head = target.model.get_input_embeddings(), target.model.get_output_embeddings()
    torch.manual_seed(args.seed)
    model = new_drafter(args, target, dataset, layer_ids) if not args.init else load_drafter_model(
        args.kind, args.init, target, torch.float32).train()
    if args.kind == "eagle3":
        trainer = Eagle3Trainer(model, embed, steps=args.ttt_steps)
    else:
        trainer = DFlashTrainer(model, embed, lm_head, anchors=args.anchors, gamma=args.gamma, seed=args.seed)
    settings = TrainSettings(epochs=args.epochs, lr=args.lr, batch_sequences=args.batch, seed=args.seed,
                             bf16=args.bf16)
    out = Path(args.out)
    result = train(trainer, dataset, Path(args.data) / f"run-{args.kind}", settings, args.minutes)
    recipe = {
        "command": "whiflash train-drafter " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
        "kind": args.kind, "target": args.model, "seed": args.seed, "sequences": len(dataset),
        "train_tokens": sum(len(t) - p for t, _, p in dataset.sequences), "settings": asdict(settings),
        "data_sources": "whiflash_sgl.train.prompts (BFCL allowed categories minus dev items, stdlib code, "
                        "python3.11-doc prose, templated math/chat and, opt-in, whole-section reading passages and "
                        "ShareGPT first user turns); responses: the target's greedy outputs",
        "categories": response_categories(Path(args.data) / "responses.jsonl"),
        "wall_minutes": round((time.time() - started) / 60, 1), **result,
    }
    if args.init:  # the lineage: what the starting point was made by
        previous = Path(args.init) / "recipe.json"
        recipe["init"] = {"from": args.init, "recipe": json.loads(previous.read_text()) if previous.is_file() else None}
    save_drafter(model, out, target, extra={"recipe": recipe})
    (out / "recipe.json").write_text(json.dumps(recipe, indent=1))
    return recipe
