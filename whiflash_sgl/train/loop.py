"""The training loop both drafters share: AdamW, warmup + cosine, gradient clipping, resumable checkpoints,
a progress bar, and a JSONL log of training loss and held-out acceptance.

A trainer object supplies ``model`` (the parameters to train), ``loss(seq) -> (loss, stats)`` for one sequence and
``evaluate(seqs) -> dict`` (held-out acceptance); the loop does the rest.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm


@dataclass
class TrainSettings:
    epochs: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_frac: float = 0.04
    batch_sequences: int = 8  # sequences per optimizer step (gradients accumulated)
    clip: float = 1.0
    seed: int = 0
    eval_every: int = 100  # optimizer steps
    heldout: int = 48  # sequences kept out of training for the acceptance log
    bf16: bool = True  # bfloat16 autocast for the forward passes (about 3x faster on AVX512-BF16 CPUs)


def train(trainer, dataset, out_dir: Path, settings: TrainSettings, max_minutes: float | None = None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    order = list(range(len(dataset)))
    rng.shuffle(order)
    heldout, train_ids = order[: settings.heldout], order[settings.heldout :]
    steps_per_epoch = max(len(train_ids) // settings.batch_sequences, 1)
    total_steps = max(int(steps_per_epoch * settings.epochs), 1)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.95), weight_decay=settings.weight_decay)
    warmup = max(int(total_steps * settings.warmup_frac), 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(max(s - warmup, 0) / max(total_steps - warmup, 1), 1.0)))))
    step = 0
    checkpoint = out_dir / "checkpoint.pt"
    if checkpoint.exists():  # resume
        saved = torch.load(checkpoint, weights_only=False)
        trainer.model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        step = saved["step"]
        rng.setstate(saved["rng"])
    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16)

    trainer.model.eval()
    with torch.no_grad(), autocast():
        initial = trainer.evaluate([dataset[i] for i in heldout])
    log = (out_dir / "train_log.jsonl").open("a")
    bar = tqdm(total=total_steps, initial=step, desc="train", file=sys.stderr)
    started = time.time()
    epoch_order: list[int] = []
    while step < total_steps:
        if max_minutes is not None and time.time() - started > max_minutes * 60:
            break
        if len(epoch_order) < settings.batch_sequences:
            epoch_order = train_ids[:]
            rng.shuffle(epoch_order)
        batch, epoch_order = epoch_order[: settings.batch_sequences], epoch_order[settings.batch_sequences :]
        trainer.model.train()
        optimizer.zero_grad(set_to_none=True)
        total, stats_sum = 0.0, {}
        for i in batch:
            with autocast():
                loss, stats = trainer.loss(dataset[i])
            (loss / len(batch)).backward()
            total += loss.item() / len(batch)
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v / len(batch)
        torch.nn.utils.clip_grad_norm_(params, settings.clip)
        optimizer.step()
        schedule.step()
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{total:.3f}")
        record = {"step": step, "loss": round(total, 4), "lr": schedule.get_last_lr()[0],
                  **{k: round(v, 4) for k, v in stats_sum.items()}}
        if step % settings.eval_every == 0 or step == total_steps:
            trainer.model.eval()
            with torch.no_grad(), autocast():
                record["heldout"] = trainer.evaluate([dataset[i] for i in heldout])
            torch.save({"model": trainer.model.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "step": step, "rng": rng.getstate()}, checkpoint)
            tqdm.write(f"step {step}: loss {total:.3f} heldout {record['heldout']}", file=sys.stderr)
        log.write(json.dumps(record) + "\n")
        log.flush()
    bar.close()
    trainer.model.eval()
    with torch.no_grad(), autocast():
        final = trainer.evaluate([dataset[i] for i in heldout])
    return {"steps": step, "total_steps": total_steps, "minutes": round((time.time() - started) / 60, 1),
            "heldout_before": initial, "heldout": final}
