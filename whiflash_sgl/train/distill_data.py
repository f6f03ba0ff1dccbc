"""Self-distillation data: the target's own greedy answers to the training prompts, and its hidden states.

Two resumable stages writing into one data folder:

1. ``responses.jsonl``: for every training prompt, the chat-templated prompt ids and the target's greedy response
   ids (batched ``generate`` with left padding). Drafters learn to predict exactly what the target says.
2. ``features-*.safetensors``: one target forward over each prompt + response capturing the residual stream
   entering the requested layers (fp16), with the token ids, sequence offsets and prompt lengths.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from whiflash_sgl.chat import encode_chat
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.jsonl import read_jsonl


MAX_PROMPT_TOKENS = 2048  # admits article-length contexts (specbench's summarization prompts run to 1,200 tokens)


def _load(model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    return model, tokenizer


def generate_responses(model_dir: Path, prompts_path: Path, out_path: Path, max_new_tokens: int = 128,
                       batch_size: int = 16, max_prompt_tokens: int = MAX_PROMPT_TOKENS) -> int:
    """Append greedy responses for prompts not yet in ``out_path``; return how many rows it holds.

    Prompts over ``max_prompt_tokens`` are skipped, and counted on stderr (an earlier cap of 768 tokens left
    article-length contexts out unnoticed).
    """
    model, tokenizer = _load(model_dir)
    eos = {model.config.eos_token_id, tokenizer.eos_token_id} - {None}
    done = set()
    if out_path.exists():
        done = {row["id"] for row in read_jsonl(out_path)}
    todo, too_long = [], 0
    for row in read_jsonl(prompts_path):
        if row["id"] in done:
            continue
        ids = encode_chat(tokenizer, row["messages"])
        if len(ids) <= max_prompt_tokens:
            todo.append((row["id"], row["category"], ids))
        else:
            too_long += 1
    if too_long:
        print(f"skipping {too_long} prompts longer than {max_prompt_tokens} tokens", file=sys.stderr)
    todo.sort(key=lambda r: len(r[2]))  # similar lengths share a batch: little padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos))
    with out_path.open("a") as out, torch.inference_mode():
        for start in tqdm(range(0, len(todo), batch_size), desc="responses", file=sys.stderr):
            batch = todo[start : start + batch_size]
            width = max(len(r[2]) for r in batch)
            input_ids = torch.full((len(batch), width), pad)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, (_, _, ids) in enumerate(batch):
                input_ids[i, width - len(ids):] = torch.tensor(ids)
                mask[i, width - len(ids):] = 1
            generated = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                       do_sample=False, pad_token_id=pad)[:, width:].tolist()
            for (rid, category, ids), response in zip(batch, generated):
                end = next((i + 1 for i, t in enumerate(response) if t in eos), len(response))
                out.write(json.dumps({"id": rid, "category": category, "prompt_ids": ids,
                                      "response_ids": response[:end]}) + "\n")
            out.flush()
    return len(done) + len(todo)


def extract_features(model_dir: Path, responses_path: Path, out_dir: Path, layers: tuple[int, ...],
                     batch_size: int = 8, shard_sequences: int = 256) -> None:
    """Write feature shards for every response row (resumes after the last complete shard)."""
    model, _ = _load(model_dir)
    rows = read_jsonl(responses_path)
    shards = [rows[i : i + shard_sequences] for i in range(0, len(rows), shard_sequences)]
    bar = tqdm(total=len(rows), desc="features", file=sys.stderr)
    for index, shard in enumerate(shards):
        path = out_dir / f"features-{index:04d}.safetensors"
        if path.exists():
            bar.update(len(shard))
            continue
        tokens, features, prompt_lens = [], [], []
        with torch.inference_mode():
            for start in range(0, len(shard), batch_size):
                batch = [r["prompt_ids"] + r["response_ids"] for r in shard[start : start + batch_size]]
                width = max(map(len, batch))
                input_ids = torch.zeros((len(batch), width), dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for i, seq in enumerate(batch):
                    input_ids[i, : len(seq)] = torch.tensor(seq)
                    mask[i, : len(seq)] = 1
                hidden = model.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
                stacked = torch.stack([hidden[layer] for layer in layers], dim=2).half()  # [b, T, L, H]
                for i, seq in enumerate(batch):
                    tokens.append(torch.tensor(seq, dtype=torch.int32))
                    features.append(stacked[i, : len(seq)].clone())
                bar.update(len(batch))
        prompt_lens = [len(r["prompt_ids"]) for r in shard]
        offsets = torch.tensor([0] + [len(t) for t in tokens]).cumsum(0)
        save_file({"tokens": torch.cat(tokens), "features": torch.cat(features), "offsets": offsets,
                   "prompt_lens": torch.tensor(prompt_lens, dtype=torch.int64),
                   "layers": torch.tensor(layers, dtype=torch.int64)}, str(path))
    bar.close()
    stored = sum(_stored_sequences(p) for p in out_dir.glob("features-*.safetensors"))
    if stored != len(rows):
        raise WhiFlashError(
            f"{out_dir} holds features of {stored} sequences but {responses_path} has {len(rows)} rows: the "
            f"responses changed after their features were written (a shard that exists is never rewritten); "
            f"delete the feature shards to write them again")


def _stored_sequences(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        return f.get_slice("prompt_lens").get_shape()[0]


class FeatureDataset:
    """All feature shards of a data folder in memory; ``[i]`` is one sequence."""

    def __init__(self, data_dir: Path, layers: tuple[int, ...]):
        paths = sorted(Path(data_dir).glob("features-*.safetensors"))
        if not paths:
            raise WhiFlashError(f"no feature shards in {data_dir}: run the data stage of `whiflash train-drafter`")
        self.sequences = []
        for path in paths:
            shard = load_file(str(path))
            stored = tuple(shard["layers"].tolist())
            if not set(layers) <= set(stored):
                raise WhiFlashError(f"{path} holds target layers {stored}, the drafter needs {layers}")
            columns = [stored.index(layer) for layer in layers]
            offsets = shard["offsets"].tolist()
            for i, prompt_len in enumerate(shard["prompt_lens"].tolist()):
                a, b = offsets[i], offsets[i + 1]
                self.sequences.append((shard["tokens"][a:b].long(), shard["features"][a:b][:, columns], prompt_len))

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i):
        return self.sequences[i]
