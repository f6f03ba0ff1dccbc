"""DFlash training: random anchors per sequence, each filling ``[x_a, MASK x (B-1)]`` in one non-causal pass.

A block anchored at response position ``a`` sees the target context of positions ``< a`` (the committed prefix,
through the same KV projections the drafter uses at inference) and its own block, not other blocks; position
``k`` of the block predicts ``x_{a+k}``. Loss: cross-entropy through the target's frozen LM head, weighted
``exp(-(k-1)/gamma)`` so the early positions, which decide the accepted length, count most.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from whiflash_sgl.drafters.dflash import DFlashModel
from whiflash_sgl.drafters.layers import heads, rope_at, rotate


@torch.no_grad()
def init_from_target(model: DFlashModel, target_model) -> None:
    """Start draft layer ``i`` from the target's ``i``-th of its last ``n`` layers (attention, MLP, norms) and the
    final norm from the target's; q/k norms start at one. ``fc`` starts as the identity on the deepest target
    feature, which is the residual stream those copied layers read in the target, so the context K/V make sense to
    them from the first step."""
    source = target_model.model.layers[-len(model.layers):]
    hidden = model.fc.out_features
    model.fc.weight.zero_()
    model.fc.weight[:, -hidden:] = torch.eye(hidden)
    model.hidden_norm.load_state_dict(source[0].input_layernorm.state_dict())
    for layer, src in zip(model.layers, source):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer.self_attn, name).load_state_dict(getattr(src.self_attn, name).state_dict())
        layer.mlp.load_state_dict(src.mlp.state_dict())
        layer.input_layernorm.load_state_dict(src.input_layernorm.state_dict())
        layer.post_attention_layernorm.load_state_dict(src.post_attention_layernorm.state_dict())
    model.norm.load_state_dict(target_model.model.norm.state_dict())


class DFlashTrainer:
    def __init__(self, model: DFlashModel, embed, lm_head, anchors: int = 8, gamma: float = 7.0, seed: int = 0):
        self.model, self.embed, self.lm_head = model, embed, lm_head
        self.anchors, self.gamma = anchors, gamma
        self.rng = random.Random(seed)
        b = model.block_size
        self.position_weight = torch.tensor([math.exp(-(k - 1) / gamma) for k in range(1, b)])

    def _blocks(self, seq, anchors: list[int]):
        """Logits ``[A, B-1, V]`` and labels ``[A, B-1]`` (-100 past the end) for blocks at ``anchors``."""
        tokens, features, _ = seq
        m, b = self.model, self.model.block_size
        n_ctx = max(anchors)  # context rows 0 .. max anchor - 1
        context = m.context(features[:n_ctx].flatten(1).float())
        ctx_rope = rope_at(m.rotary_emb, torch.arange(n_ctx), context)
        block_ids = torch.full((len(anchors), b), m.mask_token_id)
        block_ids[:, 0] = tokens[anchors]
        positions = torch.tensor(anchors)[:, None] + torch.arange(b)[None]
        with torch.no_grad():
            hidden = self.embed(block_ids).reshape(len(anchors) * b, -1)
        rope = rope_at(m.rotary_emb, positions.flatten(), hidden)
        # block row i (of block i // b) sees context rows < its anchor and every row of its own block
        anchor_of_row = torch.tensor(anchors).repeat_interleave(b)
        block_of_row = torch.arange(len(anchors)).repeat_interleave(b)
        mask = torch.cat([torch.arange(n_ctx)[None] < anchor_of_row[:, None],
                          block_of_row[:, None] == block_of_row[None]], dim=1)
        for layer in m.layers:
            attn = layer.self_attn
            ck, cv = layer.kv(context, ctx_rope)
            x = layer.input_layernorm(hidden)
            q = rotate(attn.q_norm(heads(x, attn.q_proj, layer.num_heads, layer.head_dim)), rope)
            k, v = layer.kv(x, rope)
            out = F.scaled_dot_product_attention(q, torch.cat([ck, k], 2), torch.cat([cv, v], 2),
                                                 attn_mask=mask[None, None], enable_gqa=True)
            hidden = hidden + attn.o_proj(out[0].transpose(0, 1).reshape(hidden.shape[0], -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = m.norm(hidden).reshape(len(anchors), b, -1)[:, 1:]
        labels = torch.full((len(anchors), b - 1), -100)
        for i, a in enumerate(anchors):
            span = tokens[a + 1 : a + b]
            labels[i, : len(span)] = span
        return self.lm_head(hidden), labels

    def _anchors(self, seq, count: int, rng: random.Random) -> list[int]:
        tokens, _, prompt_len = seq
        candidates = list(range(prompt_len, len(tokens) - 1))  # the anchor is a committed response token
        return sorted(rng.sample(candidates, min(count, len(candidates))))

    def loss(self, seq):
        anchors = self._anchors(seq, self.anchors, self.rng)
        if not anchors:
            return torch.zeros((), requires_grad=True), {}
        logits, labels = self._blocks(seq, anchors)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none").view(labels.shape)
        weight = self.position_weight[None] * (labels >= 0)
        valid = labels >= 0
        acc = (logits.argmax(-1)[valid] == labels[valid]).float().mean().item()
        return (ce * weight).sum() / weight.sum(), {"acc": acc}

    def evaluate(self, seqs) -> dict:
        """Held-out block acceptance: per anchor, the greedy block's accepted prefix, plus the bonus token."""
        rng = random.Random(1234)
        accepted, blocks = 0.0, 0
        for seq in seqs:
            anchors = self._anchors(seq, self.anchors, rng)
            if not anchors:
                continue
            logits, labels = self._blocks(seq, anchors)
            right = (logits.argmax(-1) == labels) & (labels >= 0)
            accepted += right.int().cumprod(-1).sum().item()
            blocks += len(anchors)
        return {"tau_block": round(1 + accepted / max(blocks, 1), 3)}
