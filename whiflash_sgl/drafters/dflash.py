"""DFlash: a block-diffusion drafter that fills ``[anchor, MASK x (B-1)]`` in one non-causal forward pass.

The checkpoint layout is that of public DFlash drafters (``DFlashDraftModel``): a few Qwen3-style decoder layers
(per-head q/k RMSNorm), ``fc`` + ``hidden_norm`` fusing the target features of ``dflash_config.target_layer_ids``
(id ``i`` = output of target layer ``i`` = HF ``hidden_states[i + 1]``) into a context vector ``c_t``, no embedding
and no LM head (the target's are used), and ``dflash_config.mask_token_id`` for the masked block positions.

In every layer the context keys and values are ``k_norm(k_proj(c_t))`` (rotated at ``t``) and ``v_proj(c_t)``: the
context is not propagated through the layers. So the context K/V of committed positions are projections only
(KV-only prefill), and the block's queries attend to all of them plus the whole block.
"""

from __future__ import annotations

import heapq
import math

import torch
from torch import nn
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding

from whiflash_sgl.drafters.base import SequenceState
from whiflash_sgl.drafters.layers import CachedDrafter, attend_each, heads, rope_at, rotate
from whiflash_sgl.drafters.node_estimates import ProbCalibration
from whiflash_sgl.kv_cache import KVCache
from whiflash_sgl.rowwise import topk_rows
from whiflash_sgl.sampling import lead_with
from whiflash_sgl.tree import DraftTree


def dflash_settings(config: Qwen3Config) -> dict:
    return dict(config.dflash_config)


class DFlashLayer(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        h, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(h, self.num_heads * hd, bias=False)
        self.self_attn.k_proj = nn.Linear(h, self.num_kv_heads * hd, bias=False)
        self.self_attn.v_proj = nn.Linear(h, self.num_kv_heads * hd, bias=False)
        self.self_attn.o_proj = nn.Linear(self.num_heads * hd, h, bias=False)
        self.self_attn.q_norm = Qwen3RMSNorm(hd, eps=config.rms_norm_eps)
        self.self_attn.k_norm = Qwen3RMSNorm(hd, eps=config.rms_norm_eps)
        self.input_layernorm = Qwen3RMSNorm(h, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(h, eps=config.rms_norm_eps)
        self.mlp = Qwen3MLP(config)

    def kv(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """K (normed, rotated) and V of rows ``x``: for context rows, the whole of a KV-only prefill."""
        attn, n, hd = self.self_attn, self.num_kv_heads, self.head_dim
        return rotate(attn.k_norm(heads(x, attn.k_proj, n, hd)), rope), heads(x, attn.v_proj, n, hd)

    def forward(self, hidden, rope, counts, contexts):
        """One layer over the block rows ``hidden`` of several sequences, ``counts[i]`` rows of sequence ``i``: a
        block's rows see every row of its own context ``contexts[i]`` (K, V) and each other."""
        attn = self.self_attn
        x = self.input_layernorm(hidden)
        q = rotate(attn.q_norm(heads(x, attn.q_proj, self.num_heads, self.head_dim)), rope)
        k, v = self.kv(x, rope)
        keys_values_masks = [
            (torch.cat([context_k, k_i], dim=2), torch.cat([context_v, v_i], dim=2),
             torch.ones(1, 1, count, context_k.shape[2] + count, dtype=torch.bool, device=q.device))
            for (context_k, context_v), k_i, v_i, count in zip(contexts, k.split(counts, dim=2), v.split(counts, dim=2),
                                                               counts)]
        hidden = hidden + attn.o_proj(attend_each(q, counts, keys_values_masks, self.head_dim**-0.5))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class DFlashModel(nn.Module):
    """The DFlash draft network (weights named as in public checkpoints)."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        settings = dflash_settings(config)
        self.target_layer_ids = list(settings["target_layer_ids"])
        self.block_size = int(settings["block_size"])
        self.mask_token_id = int(settings["mask_token_id"])
        target_hidden = getattr(config, "target_hidden_size", None) or config.hidden_size
        self.layers = nn.ModuleList(DFlashLayer(config) for _ in range(config.num_hidden_layers))
        self.fc = nn.Linear(len(self.target_layer_ids) * target_hidden, config.hidden_size, bias=False)
        self.hidden_norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config)

    def context(self, features: torch.Tensor) -> torch.Tensor:
        return self.hidden_norm(self.fc(features))

    def context_kv(self, features: torch.Tensor, positions: torch.Tensor):
        """Per layer, the K/V of context rows from their target features (KV-only prefill)."""
        c = self.context(features)
        rope = rope_at(self.rotary_emb, positions, c)
        return [layer.kv(c, rope) for layer in self.layers]

    def block(self, embeds: torch.Tensor, positions: torch.Tensor, counts, context_kv) -> torch.Tensor:
        """Normed hidden states of the block rows of several sequences (``counts[i]`` rows of sequence ``i``), given
        per layer each sequence's context K/V (``context_kv[layer][i]``)."""
        rope = rope_at(self.rotary_emb, positions, embeds)
        hidden = embeds
        for layer, contexts in zip(self.layers, context_kv):
            hidden = layer(hidden, rope, counts, contexts)
        return self.norm(hidden)


class DFlashDrafter(CachedDrafter):
    """Drafts a greedy chain of ``block_size - 1`` tokens per round, or a small tree from per-position top-k."""

    name = "dflash"

    def __init__(self, model: DFlashModel, embed: nn.Embedding, lm_head: nn.Module,
                 block_size: int | None = None, tree_topk: int = 1, tree_budget: int = 0):
        self.model, self.embed, self.lm_head = model.eval(), embed, lm_head
        self.block_size = block_size or model.block_size
        if self.block_size < 2:
            raise ValueError(f"DFlash block size must be >= 2, got {self.block_size}")
        self.tree_topk, self.tree_budget = tree_topk, tree_budget
        self.feature_layers = tuple(i + 1 for i in model.target_layer_ids)
        self.cache = KVCache()
        self.estimates = ProbCalibration()  # its path probabilities, corrected by what verification accepts
        self.frontier = 0
        self.last_confidences: list[float] = []  # top-1 probability per drafted position, for the router

    def _context_kv(self, states, spans, positions):
        dtype = self.model.norm.weight.dtype
        features = [s.context_features(self.feature_layers, a, b, dtype) for s, (a, b) in zip(states, spans)]
        return self.model.context_kv(torch.cat(features), positions)

    @classmethod
    @torch.inference_mode()
    def _propose_group(cls, drafters, states, max_depths) -> list[DraftTree]:
        """One forward over all blocks (each attends to its own context and itself), one LM head over all drafted
        rows."""
        cls.catch_up_batch(drafters, states)
        trees = [DraftTree()] * len(drafters)
        lengths = [min(d.block_size - 1, max_depth) for d, max_depth in zip(drafters, max_depths)]
        live = [i for i, length in enumerate(lengths) if length >= 1]
        if not live:
            return trees
        first = drafters[live[0]]
        m, device = first.model, first.model.norm.weight.device
        blocks = [[states[i].tokens[-1]] + [m.mask_token_id] * lengths[i] for i in live]
        positions = torch.cat([torch.arange(len(states[i].tokens) - 1, len(states[i].tokens) + lengths[i])
                               for i in live]).to(device)
        counts = [len(block) for block in blocks]
        context = [[(drafters[i].cache.layers[layer].keys, drafters[i].cache.layers[layer].values) for i in live]
                   for layer in range(len(m.layers))]
        hidden = m.block(first.embed(torch.tensor([t for block in blocks for t in block], device=device)), positions,
                         counts, context)
        drafted = torch.cat([torch.arange(start + 1, start + count)  # every row but the anchors
                             for start, count in zip(torch.tensor([0] + counts).cumsum(0).tolist(), counts)])
        logits = first.lm_head(hidden[drafted.to(device)]).float()
        logp = torch.log_softmax(logits, dim=-1)
        drafted_counts = [lengths[i] for i in live]
        for i, logits_i, logp_i in zip(live, logits.split(drafted_counts), logp.split(drafted_counts)):
            trees[i] = drafters[i]._tree(states[i], logits_i, logp_i)
        return trees

    def _tree(self, state: SequenceState, logits: torch.Tensor, logp: torch.Tensor) -> DraftTree:
        """The draft from the block's drafted rows (row j drafts position n + j): a greedy chain or a small tree."""
        self.last_confidences = logp.amax(dim=-1).exp().tolist()
        if state.sampler is not None:  # keyed rule: the guess of the target's keyed sample leads (row j keyed n-1+j)
            n = len(state.tokens)
            logp = lead_with(logp, state.sampler.guesses(logits, torch.arange(n - 1, n - 1 + logits.shape[0])))
        top_p, top_ids = topk_rows(logp.exp(), max(self.tree_topk, 1))
        if self.tree_topk <= 1:  # a node's probability: the product of its block's marginals up to it
            chain = top_ids[:, 0].tolist()
            return DraftTree(tuple(chain), tuple(range(-1, len(chain) - 1)), tuple(top_p[:, 0].cumprod(0).tolist()))
        return _marginal_tree(top_p, top_ids, self.tree_budget or 2 * logits.shape[0])


def _marginal_tree(top_p: torch.Tensor, top_ids: torch.Tensor, budget: int) -> DraftTree:
    """Best-first tree over per-position candidates, a path scored by the product of its positions' marginals.

    The block's positions are predicted independently, so a node's score is its parent's times the marginal of its
    own token at its depth; popping the best open node ``budget`` times keeps the tree ancestor-closed.
    """
    length, k = top_ids.shape
    logp = top_p.clamp_min(1e-12).log().tolist()
    ids = top_ids.tolist()
    tokens: list[int] = []
    parents: list[int] = []
    probs: list[float] = []
    heap = [(-logp[0][c], -1, 0, c) for c in range(k)]
    heapq.heapify(heap)
    while heap and len(tokens) < budget:
        neg_score, parent, depth, c = heapq.heappop(heap)
        tokens.append(ids[depth][c])
        parents.append(parent)
        probs.append(math.exp(-neg_score))
        if depth + 1 < length:
            node = len(tokens) - 1
            for c2 in range(k):
                heapq.heappush(heap, (neg_score - logp[depth + 1][c2], node, depth + 1, c2))
    return DraftTree(tuple(tokens), tuple(parents), tuple(probs))
