"""Router traces and the learned policy: ``whiflash collect-traces`` runs the oracle (every paradigm drafts from
the same prefix each round) over training prompts and records the router's features with what each paradigm
alone would have accepted; ``whiflash train-policy`` fits :class:`RouterMLP` to predict each paradigm's tau, and
each hedge's (the longest acceptance among its paradigms, which the traces hold exactly)."""

from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from whiflash_sgl.chat import encode_chat, load_prompts
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.jsonl import read_jsonl
from whiflash_sgl.methods import make_method
from whiflash_sgl.policies.mlp import RouterMLP
from whiflash_sgl.router import RoundFeatures, hedge, members
from whiflash_sgl.sampling import SamplingParams


def collect_traces(target, prompts_path: Path, out_path: Path, config, limit: int | None, max_new_tokens: int,
                   seed: int = 0) -> int:
    """Append one JSON line per oracle round; returns the number of rounds written."""
    prompts = load_prompts(prompts_path)
    random.Random(seed).shuffle(prompts)
    prompts = prompts[:limit]
    method = make_method("oracle", target, config)
    oracle = method.drafter
    rows = 0
    with out_path.open("a") as out:
        for prompt in tqdm(prompts, desc="traces", file=sys.stderr):
            oracle.traces = []
            method.generate(encode_chat(target.tokenizer, prompt.messages), max_new_tokens, SamplingParams(), seed)
            for trace in oracle.traces:
                out.write(json.dumps({"prompt": prompt.id, "category": prompt.category,
                                      "features": asdict(trace["features"]), "accepted": trace["accepted"],
                                      "draft_tokens": trace["draft_tokens"],
                                      "draft_seconds": trace["draft_seconds"]}) + "\n")
                rows += 1
    return rows


def _load(traces_path: Path, hedges: list[str]):
    if not traces_path.is_file():
        raise WhiFlashError(f"traces file {traces_path} does not exist; make one with `whiflash collect-traces`")
    rows = read_jsonl(traces_path)
    if len(rows) < 50:
        raise WhiFlashError(f"{traces_path} has {len(rows)} rounds; collect more traces (at least 50)")
    paradigms = sorted(rows[0]["accepted"])
    for h in hedges:
        if len(members(h)) < 2 or not set(members(h)) <= set(paradigms):
            raise WhiFlashError(f"hedge {h!r} must join two or more of the traced paradigms {paradigms} with '+'")
    actions = paradigms + [hedge(members(h)) for h in hedges]
    x = torch.tensor([RoundFeatures(**r["features"]).vector() for r in rows])
    y = torch.tensor([[max(r["accepted"][p] for p in members(a)) + 1.0 for a in actions] for r in rows])
    prompts = [r["prompt"] for r in rows]
    return paradigms, actions, x, y, prompts


def train_policy(traces_path: Path, out_dir: Path, epochs: int = 300, hidden: int = 32, seed: int = 0,
                 hedges: list[str] = ()) -> dict:
    """Fit the MLP (MSE on tau per action), holding out a fifth of the prompts; report held-out error and how
    often the predicted best paradigm is the true best."""
    paradigms, actions, x, y, prompts = _load(traces_path, list(hedges))
    names = sorted(set(prompts))
    random.Random(seed).shuffle(names)
    heldout_names = set(names[: max(len(names) // 5, 1)])
    heldout = torch.tensor([p in heldout_names for p in prompts])
    torch.manual_seed(seed)
    model = RouterMLP(x.shape[1], actions, hidden)
    model.mean.copy_(x[~heldout].mean(0))
    model.std.copy_(x[~heldout].std(0).clamp_min(1e-3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
    for _ in tqdm(range(epochs), desc="train-policy", file=sys.stderr):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[~heldout]), y[~heldout])
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        pred = model(x[heldout])
    truth = y[heldout]
    mae = {a: round(float((pred[:, i] - truth[:, i]).abs().mean()), 3) for i, a in enumerate(actions)}
    # picking is scored among single paradigms: a hedge's tau is never below its parts', so it would always win
    pred, truth = pred[:, : len(paradigms)], truth[:, : len(paradigms)]
    best_true = truth.max(1).values
    picked = truth.gather(1, pred.argmax(1, keepdim=True))[:, 0]
    metrics = {
        "rounds": len(prompts), "heldout_rounds": int(heldout.sum()), "paradigms": paradigms, "actions": actions,
        "heldout_mae": mae,
        "heldout_pick_best": round(float((picked == best_true).float().mean()), 3),
        "heldout_tau_picked": round(float(picked.mean()), 3),
        "heldout_tau_oracle": round(float(best_true.mean()), 3),
        **{f"heldout_tau_always_{p}": round(float(truth[:, i].mean()), 3) for i, p in enumerate(paradigms)},
    }
    model.save(out_dir, {"metrics": metrics, "traces": str(traces_path), "epochs": epochs, "seed": seed})
    return metrics
