"""EAGLE-3 training with training-time test (TTT): the draft layer is unrolled ``steps`` times per sequence.

Step 0 reads the committed pairs (target feature ``F_t``, token ``x_{t+1}``) and predicts ``x_{t+2}``. Step ``k``
reads its own previous output at the same index with the next token and predicts ``x_{t+2+k}``, attending to the
step-0 keys of positions ``<= t`` plus its own earlier steps at ``t``: exactly what a chain node at depth ``k`` sees
when drafting. Loss: cross-entropy on the draft vocabulary against the target's own greedy tokens (the data are
its responses), weighted ``decay**k``. Rows before the response need only step-0 keys and values, which are
projections (the same KV-only path the drafter uses to catch up), so they cost little.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F

from whiflash_sgl.drafters.eagle3 import Eagle3Model
from whiflash_sgl.drafters.layers import heads, rotate


def draft_vocabulary(dataset, size: int, vocab_size: int) -> torch.Tensor:
    """The ``size`` target tokens most frequent in the responses (then in the prompts), ascending ids."""
    counts: Counter = Counter()
    for tokens, _, prompt_len in dataset.sequences:
        counts.update(tokens[prompt_len:].tolist())
    ranked = [t for t, _ in counts.most_common()]
    if len(ranked) < size:
        prompt_counts: Counter = Counter()
        for tokens, _, prompt_len in dataset.sequences:
            prompt_counts.update(tokens[:prompt_len].tolist())
        ranked += [t for t, _ in prompt_counts.most_common() if t not in set(ranked)]
    ranked += [t for t in range(vocab_size) if t not in set(ranked)]
    return torch.tensor(sorted(ranked[:size]))


def set_vocabulary(model: Eagle3Model, draft_ids: torch.Tensor) -> None:
    model.d2t.copy_(draft_ids - torch.arange(len(draft_ids)))
    model.t2d.zero_()
    model.t2d[draft_ids] = True


@torch.no_grad()
def init_from_target(model: Eagle3Model, target_model) -> None:
    """Start the draft layer's MLP and head where the target ends: its last layer's MLP and post-attention norm,
    its final norm, and its LM-head rows for the draft vocabulary. On a CPU budget this converges far faster than
    random weights; attention and ``fc`` (shapes of their own) start random."""
    last = target_model.model.layers[-1]
    model.midlayer.mlp.load_state_dict(last.mlp.state_dict())
    model.midlayer.post_attention_layernorm.load_state_dict(last.post_attention_layernorm.state_dict())
    model.norm.load_state_dict(target_model.model.norm.state_dict())
    draft_ids = model.d2t + torch.arange(len(model.d2t))
    model.lm_head.weight.copy_(target_model.get_output_embeddings().weight[draft_ids])


class Eagle3Trainer:
    def __init__(self, model: Eagle3Model, embed: torch.nn.Embedding, steps: int = 4, decay: float = 0.8):
        self.model, self.embed, self.steps, self.decay = model, embed, steps, decay
        draft_ids = model.d2t + torch.arange(len(model.d2t))
        self.to_draft = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
        self.to_draft[draft_ids] = torch.arange(len(draft_ids))

    def _unroll(self, seq):
        """Per step: draft logits ``[m_k, Vd]`` and labels (draft ids, -1 = outside the draft vocabulary)."""
        tokens, features, prompt_len = seq
        m, layer = self.model, self.model.midlayer
        n_pairs = len(tokens) - 1  # pairs t = 0 .. T-2
        first = max(prompt_len - 2, 0)  # rows whose prediction x_{t+2} is a response token
        hidden = m.fc(features[:n_pairs].flatten(1).float())
        with torch.no_grad():
            emb = self.embed(tokens)
        x = layer.attention_input(emb[1 : n_pairs + 1], hidden)
        rope_all = m.rope(torch.arange(n_pairs), x)
        k0, v0 = layer.kv(x, rope_all)  # keys/values of every committed pair (KV-only for the context)
        group = layer.num_heads // layer.num_kv_heads
        k0, v0 = k0[0].repeat_interleave(group, 0), v0[0].repeat_interleave(group, 0)  # [nh, P, hd]
        outputs = []
        prev_out, diag_k, diag_v = None, [], []
        for step in range(self.steps):
            rows = torch.arange(first, n_pairs - 1 - step)  # t with a label x_{t+2+step} inside the sequence
            if len(rows) == 0:
                break
            if step == 0:
                xs, residual = x[rows], hidden[rows]
            else:
                residual = prev_out[: len(rows)]
                xs = layer.attention_input(emb[rows + 1 + step], residual)
            rope = (rope_all[0][rows], rope_all[1][rows]) if step == 0 else m.rope(rows + step, xs)
            q = rotate(heads(xs, layer.self_attn.q_proj, layer.num_heads, layer.head_dim), rope)[0]
            if step > 0:
                k, v = layer.kv(xs, rope)
                diag_k.append(k[0].repeat_interleave(group, 0))
                diag_v.append(v[0].repeat_interleave(group, 0))
            scale = layer.head_dim**-0.5
            scores = (q @ k0.transpose(1, 2)) * scale  # [nh, m, P]
            causal = torch.arange(n_pairs)[None, :] <= rows[:, None]
            scores = scores.masked_fill(~causal, float("-inf"))
            diag = [((q * dk[:, : len(rows)]).sum(-1, keepdim=True)) * scale for dk in diag_k]
            weights = torch.softmax(torch.cat([scores, *diag], dim=-1), dim=-1)
            attn = weights[..., :n_pairs] @ v0
            for j, dv in enumerate(diag_v):
                attn = attn + weights[..., n_pairs + j : n_pairs + j + 1] * dv[:, : len(rows)]
            attn = attn.transpose(0, 1).reshape(len(rows), -1)
            h = residual + layer.self_attn.o_proj(attn)
            out = h + layer.mlp(layer.post_attention_layernorm(h))
            logits = m.lm_head(m.norm(out))
            labels = self.to_draft[tokens[rows + 2 + step]]
            outputs.append((logits, labels))
            prev_out = out
        return outputs

    def loss(self, seq):
        total, weight_sum, stats = 0.0, 0.0, {}
        for step, (logits, labels) in enumerate(self._unroll(seq)):
            valid = labels >= 0
            if valid.any():
                ce = F.cross_entropy(logits[valid].float(), labels[valid])
                total = total + (self.decay**step) * ce
                weight_sum += self.decay**step
                stats[f"acc{step}"] = (logits[valid].argmax(-1) == labels[valid]).float().mean().item()
        if not weight_sum:  # a response too short to label, or only tokens outside the draft vocabulary
            return torch.zeros((), requires_grad=True), stats
        return total / weight_sum, stats

    def evaluate(self, seqs) -> dict:
        """Held-out chain acceptance: per response position, how many unrolled steps are right in a row."""
        accepted, positions, top1 = 0.0, 0, []
        for seq in seqs:
            outs = self._unroll(seq)
            if not outs:
                continue
            correct = [(lg.argmax(-1) == lb) for lg, lb in outs]
            m0 = len(correct[0])
            run = torch.ones(m0, dtype=torch.bool)
            for c in correct:
                run = run[: len(c)] & c
                accepted += run.float().sum().item()
            positions += m0
            top1.append(correct[0].float().mean().item())
        return {"tau_chain": round(1 + accepted / max(positions, 1), 3),
                "top1": round(sum(top1) / max(len(top1), 1), 4)}
