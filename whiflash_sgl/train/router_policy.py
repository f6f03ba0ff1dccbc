"""Router traces and the learned policy: ``whiflash collect-traces`` runs the oracle (every paradigm drafts from
the same prefix each round) over training prompts and records the router's features with what each paradigm
alone would have accepted; ``whiflash train-policy`` fits :class:`RouterMLP` to predict each paradigm's tau."""

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
from whiflash_sgl.methods import make_method
from whiflash_sgl.policies.mlp import RouterMLP
from whiflash_sgl.router import RoundFeatures
from whiflash_sgl.verify import SamplingParams


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


def _load(traces_path: Path):
    if not traces_path.is_file():
        raise WhiFlashError(f"traces file {traces_path} does not exist; make one with `whiflash collect-traces`")
    rows = [json.loads(line) for line in traces_path.read_text().splitlines() if line.strip()]
    if len(rows) < 50:
        raise WhiFlashError(f"{traces_path} has {len(rows)} rounds; collect more traces (at least 50)")
    paradigms = sorted(rows[0]["accepted"])
    x = torch.tensor([RoundFeatures(**r["features"]).vector() for r in rows])
    y = torch.tensor([[r["accepted"][p] + 1.0 for p in paradigms] for r in rows])
    prompts = [r["prompt"] for r in rows]
    return paradigms, x, y, prompts


def train_policy(traces_path: Path, out_dir: Path, epochs: int = 300, hidden: int = 32, seed: int = 0) -> dict:
    """Fit the MLP (MSE on tau per paradigm), holding out a fifth of the prompts; report held-out error and how
    often the predicted best paradigm is the true best."""
    paradigms, x, y, prompts = _load(traces_path)
    names = sorted(set(prompts))
    random.Random(seed).shuffle(names)
    heldout_names = set(names[: max(len(names) // 5, 1)])
    heldout = torch.tensor([p in heldout_names for p in prompts])
    torch.manual_seed(seed)
    model = RouterMLP(x.shape[1], paradigms, hidden)
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
    best_true = truth.max(1).values
    picked = truth.gather(1, pred.argmax(1, keepdim=True))[:, 0]
    metrics = {
        "rounds": len(prompts), "heldout_rounds": int(heldout.sum()), "paradigms": paradigms,
        "heldout_mae": {p: round(float((pred[:, i] - truth[:, i]).abs().mean()), 3) for i, p in enumerate(paradigms)},
        "heldout_pick_best": round(float((picked == best_true).float().mean()), 3),
        "heldout_tau_picked": round(float(picked.mean()), 3),
        "heldout_tau_oracle": round(float(best_true.mean()), 3),
        **{f"heldout_tau_always_{p}": round(float(truth[:, i].mean()), 3) for i, p in enumerate(paradigms)},
    }
    model.save(out_dir, {"metrics": metrics, "traces": str(traces_path), "epochs": epochs, "seed": seed})
    return metrics
