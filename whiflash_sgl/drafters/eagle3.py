"""EAGLE-3: one decoder layer over fused low/mid/high target features, drafting an EAGLE-2-style dynamic tree.

The checkpoint layout is that of public EAGLE-3 drafters (SGLang's ``LlamaForCausalLMEagle3``): ``fc`` fuses the
concatenated target features (``3*H_target -> H``); ``midlayer`` is a Llama decoder layer whose attention reads
``cat(input_layernorm(embed(token)), hidden_norm(hidden))`` (2H wide) and whose residual stream is ``hidden``;
``lm_head`` covers a reduced draft vocabulary mapped back by ``d2t`` (``target_id = draft_id + d2t[draft_id]``).
The embedding is the target's. ``eagle_config.eagle_aux_hidden_state_layer_ids`` follows SGLang: id ``i`` is the
output of target layer ``i``, i.e. HF ``hidden_states[i + 1]``.

At committed position ``t`` the layer reads the pair (target feature ``F_t``, token ``x_{t+1}``). Its K/V there are
pure projections of that pair, so catching up a backlog needs no queries, attention or MLP (KV-only prefill); only
the newest pair runs the full layer, giving the hidden state and logits that seed the tree.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from whiflash_sgl.drafters.base import Drafter, SequenceState
from whiflash_sgl.drafters.layers import heads, rope_at, rotate
from whiflash_sgl.kernels import tree_attention
from whiflash_sgl.kv_cache import KVCache
from whiflash_sgl.sampling import KeyedSampler, lead_with
from whiflash_sgl.tree import DraftTree


def aux_layer_ids(config: LlamaConfig) -> list[int]:
    return list(config.eagle_config["eagle_aux_hidden_state_layer_ids"])


class Eagle3Layer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.input_layernorm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
        self.hidden_norm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(2 * h, self.num_heads * hd, bias=False)
        self.self_attn.k_proj = nn.Linear(2 * h, self.num_kv_heads * hd, bias=False)
        self.self_attn.v_proj = nn.Linear(2 * h, self.num_kv_heads * hd, bias=False)
        self.self_attn.o_proj = nn.Linear(self.num_heads * hd, h, bias=False)
        self.post_attention_layernorm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def attention_input(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)

    def kv(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """K (rotated) and V of attention inputs ``x`` ``[m, 2H]``: the whole of a KV-only prefill."""
        attn, n, hd = self.self_attn, self.num_kv_heads, self.head_dim
        return rotate(heads(x, attn.k_proj, n, hd), rope), heads(x, attn.v_proj, n, hd)

    def forward(self, x, residual, rope, keys, values, mask):
        """Full layer for rows ``x`` (attention inputs) whose own K/V are already at the end of ``keys``/``values``."""
        q = rotate(heads(x, self.self_attn.q_proj, self.num_heads, self.head_dim), rope)
        attn = tree_attention(q, keys, values, mask, self.head_dim**-0.5)[0].reshape(x.shape[0], -1)
        h = residual + self.self_attn.o_proj(attn)
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Model(nn.Module):
    """The EAGLE-3 draft network (weights named as in public checkpoints)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        target_hidden = getattr(config, "target_hidden_size", None) or config.hidden_size
        self.fc = nn.Linear(len(aux_layer_ids(config)) * target_hidden, config.hidden_size, bias=False)
        self.midlayer = Eagle3Layer(config)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def rope(self, positions: torch.Tensor, like: torch.Tensor):
        return rope_at(self.rotary_emb, positions, like)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]


class Eagle3Drafter(Drafter):
    """Drafts with an :class:`Eagle3Model`: a dynamic tree (``topk`` > 1) or a chain (``topk`` = 1)."""

    name = "eagle3"

    def __init__(self, model: Eagle3Model, embed: nn.Embedding, depth: int = 6, topk: int = 4, budget: int = 16,
                 min_prob: float = 0.0):
        if depth < 1 or topk < 1 or budget < 1:
            raise ValueError("EAGLE-3 depth, topk and budget must be >= 1")
        if not 0.0 <= min_prob < 1.0:
            raise ValueError(f"EAGLE-3 min_prob must be in [0, 1), got {min_prob}")
        self.model, self.embed = model.eval(), embed
        self.depth, self.topk, self.budget = depth, topk, budget
        # nodes whose cumulative draft probability falls below this are neither expanded nor sent to verification:
        # the draft stops early where the drafter is unsure, which saves draft steps and verify rows
        self.min_logp = math.log(min_prob) if min_prob > 0 else -math.inf
        self.feature_layers = tuple(i + 1 for i in aux_layer_ids(model.config))
        self.cache = KVCache()
        self.frontier = 0  # committed pairs (F_t, x_{t+1}) whose K/V are cached: t < frontier
        self.last_scores: list[float] = []  # cumulative draft log-prob of each node of the last tree
        self.sampler: KeyedSampler | None = None  # the sequence's keyed draw, while proposing

    def start(self, state: SequenceState) -> None:
        self.cache = KVCache()
        self.frontier = 0

    def pending(self, state: SequenceState) -> int:
        return max(len(state.tokens) - 2 - self.frontier, 0)

    def _pairs(self, state: SequenceState, start: int, end: int):
        """Attention inputs and residuals of the committed pairs ``t in [start, end)``."""
        m = self.model
        hidden = m.fc(state.context_features(self.feature_layers, start, end, m.fc.weight.dtype))
        tokens = torch.tensor(state.tokens[start + 1 : end + 1], device=hidden.device)
        return m.midlayer.attention_input(self.embed(tokens), hidden), hidden

    @torch.inference_mode()
    def catch_up(self, state: SequenceState) -> None:
        """KV-only prefill of every committed pair but the newest (which :meth:`propose` runs in full)."""
        end = len(state.tokens) - 2
        if end <= self.frontier:
            return
        x, _ = self._pairs(state, self.frontier, end)
        k, v = self.model.midlayer.kv(x, self.model.rope(torch.arange(self.frontier, end, device=x.device), x))
        self.cache.update(k, v, 0)
        self.frontier = end

    def _rows(self, x, residual, positions, mask):
        """Full layer on new rows: write their K/V, attend, return (pre-norm hidden, draft log-probs)."""
        m = self.model
        rope = m.rope(positions, x)
        k, v = m.midlayer.kv(x, rope)
        keys, values = self.cache.update(k, v, 0)
        out = m.midlayer(x, residual, rope, keys, values, mask)
        return out, self._draft_logp(m.lm_head(m.norm(out)).float(), positions)

    def _draft_logp(self, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """What the tree is built from: the draft's log-probs, and under the keyed rule with the draft's guess of
        the target's keyed sample leading (``sampling.lead_with``). A row at draft position t predicts the token
        the target keys at t + 1; the guess is drawn in the target vocabulary, where the target's noise lives."""
        logp = torch.log_softmax(logits, dim=-1)
        if self.sampler is None:
            return logp
        m = self.model
        ids = m.to_target_ids(torch.arange(logits.shape[-1], device=logits.device))
        full = logits.new_full((logits.shape[0], m.t2d.numel()), -math.inf)
        full[:, ids] = logits
        guesses = self.sampler.guesses(full, positions + 1)
        return lead_with(logp, (ids[None, :] == guesses[:, None]).int().argmax(-1))

    @torch.inference_mode()
    def propose(self, state: SequenceState, max_depth: int) -> DraftTree:
        self.catch_up(state)
        self.sampler = state.sampler
        n = len(state.tokens)
        root_pos = n - 2  # the newest pair (F_{n-2}, root token) sits at position n-2
        x, hidden = self._pairs(state, root_pos, n - 1)
        out, logp = self._rows(x, hidden, torch.tensor([root_pos], device=x.device), None)
        self.frontier = n - 1
        depth = min(self.depth, max_depth)
        if depth < 1:
            return DraftTree()
        tree, self.last_scores = self._expand(out, logp[0], root_pos, depth)
        self.cache.truncate(n - 1)
        return tree

    def _expand(self, root_out, root_logp, root_pos: int, depth: int) -> tuple[DraftTree, list[float]]:
        """EAGLE-2 dynamic tree: expand the ``topk`` best frontier nodes per step, rerank all by cumulative log-prob."""
        k = self.topk
        scores, ids = root_logp.topk(k)
        # every generated node: (score, depth, parent node index or -1, target token)
        nodes = [(float(s), 1, -1, int(t)) for s, t in zip(scores, self.model.to_target_ids(ids))]
        frontier = [i for i in range(len(nodes)) if nodes[i][0] >= self.min_logp]
        parent_out = root_out.expand(len(frontier), -1)
        rows: dict[int, int] = {}  # node -> its row in the draft cache once expanded
        committed = self.cache.get_seq_length()
        for d in range(1, depth):
            if not frontier:
                break
            tokens = torch.tensor([nodes[i][3] for i in frontier], device=root_out.device)
            x = self.model.midlayer.attention_input(self.embed(tokens), parent_out)
            first_row = self.cache.get_seq_length()
            for offset, i in enumerate(frontier):
                rows[i] = first_row + offset
            mask = torch.zeros(len(frontier), first_row + len(frontier), dtype=torch.bool)
            mask[:, :committed] = True
            for r, i in enumerate(frontier):
                j = i
                while j >= 0:
                    mask[r, rows[j]] = True
                    j = nodes[j][2]
            positions = torch.full((len(frontier),), root_pos + d, device=x.device)
            out, logp = self._rows(x, parent_out, positions, mask[None, None].to(x.device))
            child_scores, child_ids = logp.topk(k, dim=-1)
            child_scores = child_scores.cpu() + torch.tensor([nodes[i][0] for i in frontier])[:, None]
            child_tokens = self.model.to_target_ids(child_ids).cpu()
            first_child = len(nodes)
            for r, i in enumerate(frontier):
                nodes.extend((float(child_scores[r, c]), d + 1, i, int(child_tokens[r, c])) for c in range(k))
            flat = child_scores.flatten()
            best = [b for b in flat.topk(min(k, flat.numel())).indices.tolist() if flat[b] >= self.min_logp]
            frontier = [first_child + b for b in best]
            parent_out = out[[b // k for b in best]]
        return _best_subtree(nodes, self.budget, self.min_logp)


def _best_subtree(nodes: list[tuple[float, int, int, int]], budget: int,
                  min_logp: float = -math.inf) -> tuple[DraftTree, list[float]]:
    """The ``budget`` highest-scoring nodes scoring at least ``min_logp`` (scores fall along a path, so ancestors
    come along), in depth order."""
    ranked = sorted(range(len(nodes)), key=lambda i: (-nodes[i][0], nodes[i][1]))[:budget]
    ranked = [i for i in ranked if nodes[i][0] >= min_logp]
    chosen = set(ranked)
    for i in ranked:  # ties could leave out an ancestor; bring it in
        j = nodes[i][2]
        while j >= 0 and j not in chosen:
            chosen.add(j)
            j = nodes[j][2]
    order = sorted(chosen, key=lambda i: (nodes[i][1], -nodes[i][0]))
    index = {node: pos for pos, node in enumerate(order)}
    tree = DraftTree(
        tokens=tuple(nodes[i][3] for i in order),
        parents=tuple(-1 if nodes[i][2] < 0 else index[nodes[i][2]] for i in order),
    )
    return tree, [nodes[i][0] for i in order]
