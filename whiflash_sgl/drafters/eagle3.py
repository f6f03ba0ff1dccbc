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
import time
from collections.abc import Sequence

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from whiflash_sgl.drafters.base import SequenceState
from whiflash_sgl.drafters.layers import CachedDrafter, attend_each, attention_dtype, heads, rope_at, rotate
from whiflash_sgl.drafters.node_estimates import ProbCalibration
from whiflash_sgl.kv_cache import KVCache
from whiflash_sgl.rowwise import topk_rows
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

    def forward(self, x, residual, rope, counts, keys_values_masks):
        """Full layer for rows ``x`` (attention inputs) of several sequences, ``counts[i]`` rows of sequence ``i``,
        whose own K/V are already at the end of that sequence's ``keys_values_masks[i]`` (see
        :func:`~whiflash_sgl.drafters.layers.attend_each`)."""
        q = rotate(heads(x, self.self_attn.q_proj, self.num_heads, self.head_dim), rope)
        attn = attend_each(q, counts, keys_values_masks, self.head_dim**-0.5)
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


class StepClock:
    """Seconds of one tree-depth step by the number of sequences in it, a running mean per count, shared by a
    drafter's forks: what the next step would cost the batch (0 before any step was timed)."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}

    def observe(self, sequences: int, seconds: float) -> None:
        old = self.seconds.get(sequences)
        self.seconds[sequences] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def __call__(self, sequences: int) -> float:
        if not self.seconds:
            return 0.0
        return self.seconds[min(self.seconds, key=lambda count: (abs(count - sequences), -count))]


class Eagle3Drafter(CachedDrafter):
    """Drafts with an :class:`Eagle3Model`: a dynamic tree (``topk`` > 1) or a chain (``topk`` = 1)."""

    name = "eagle3"
    lag = 2  # the newest pair (F_{n-2}, root token) is not caught up: proposing runs it through the full layer

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
        self.cache = self.new_cache()
        self.estimates = ProbCalibration()  # its path probabilities, corrected by what verification accepts
        self.step_clock = StepClock()  # shared by the forks, as the estimates are
        self.frontier = 0  # committed pairs (F_t, x_{t+1}) whose K/V are cached: t < frontier
        self.last_scores: list[float] = []  # cumulative draft log-prob of each node of the last tree
        self.sampler: KeyedSampler | None = None  # the sequence's keyed draw, while proposing

    def new_cache(self) -> KVCache:
        return KVCache(attention_dtype(self.model))

    def _pairs(self, states: Sequence[SequenceState], spans: Sequence[tuple[int, int]]):
        """Attention inputs and residuals of the committed pairs ``t in [start, end)`` of each sequence (one span
        each), concatenated."""
        m, dtype = self.model, self.model.norm.weight.dtype
        features = [s.context_features(self.feature_layers, a, b, dtype) for s, (a, b) in zip(states, spans)]
        hidden = m.fc(torch.cat(features) if len(features) > 1 else features[0])
        tokens = torch.tensor([t for s, (a, b) in zip(states, spans) for t in s.tokens[a + 1 : b + 1]],
                              device=hidden.device)
        return m.midlayer.attention_input(self.embed(tokens), hidden), hidden

    def _context_kv(self, states, spans, positions):
        """KV-only prefill: K/V of committed pairs, projections of their attention inputs only."""
        x, _ = self._pairs(states, spans)
        return [self.model.midlayer.kv(x, self.model.rope(positions, x))]

    @staticmethod
    def _rows(drafters: Sequence["Eagle3Drafter"], x, residual, positions, counts: Sequence[int], masks,
              newest_only: bool = False):
        """Full layer on new rows of several sequences (``counts[i]`` rows of ``drafters[i]``'s, attending as
        ``masks[i]`` says): write each one's K/V into its own cache, attend, return (pre-norm hidden, draft
        log-probs), rows in input order. ``newest_only``: only each sequence's last row runs the layer (attending to
        all its keys), the rows before it are a catch-up, whose K/V are all it needs."""
        m = drafters[0].model
        rope = m.rope(positions, x)
        k, v = m.midlayer.kv(x, rope)
        keys_values = [d.cache.update(k_i, v_i, 0) for d, k_i, v_i
                       in zip(drafters, k.split(counts, dim=2), v.split(counts, dim=2))]
        if newest_only:
            last = torch.tensor(counts).cumsum(0) - 1
            x, residual, positions, rope = x[last], residual[last], positions[last], (rope[0][last], rope[1][last])
            counts = [1] * len(counts)
        out = m.midlayer(x, residual, rope, counts, [(*kv, mask) for kv, mask in zip(keys_values, masks)])
        logits = m.lm_head(m.norm(out)).float()
        logp = torch.log_softmax(logits, dim=-1)
        first = 0
        for d, count in zip(drafters, counts):
            if d.sampler is not None:
                rows = slice(first, first + count)
                logp[rows] = d._keyed(logits[rows], logp[rows], positions[rows])
            first += count
        return out, logp

    def _keyed(self, logits: torch.Tensor, logp: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Under the keyed rule, what the tree is built from: the draft's log-probs with the draft's guess of the
        target's keyed sample leading (``sampling.lead_with``). A row at draft position t predicts the token the
        target keys at t + 1; the guess is drawn in the target vocabulary, where the target's noise lives."""
        m = self.model
        ids = m.to_target_ids(torch.arange(logits.shape[-1], device=logits.device))
        full = logits.new_full((logits.shape[0], m.t2d.numel()), -math.inf)
        full[:, ids] = logits
        guesses = self.sampler.guesses(full, positions + 1)
        return lead_with(logp, (ids[None, :] == guesses[:, None]).int().argmax(-1))

    @classmethod
    def _roots(cls, drafters: Sequence["Eagle3Drafter"], states: Sequence[SequenceState]):
        """The full layer on each sequence's newest pair (F_{n-2}, root token), which seeds its tree, in one pass
        with the pairs its cache still lacks: their K/V (the KV-only prefill of catch-up) come from the same
        projections, and only the newest rows go on to attention, MLP and head. Returns the roots' (pre-norm hidden,
        draft log-probs). With this and one top-k for all roots (``_propose_group``), a call of first steps for 8
        sequences 3 positions behind took 3.7 ms on a 2-core CPU, against 4.7-5.2 ms with a separate catch-up and a
        top-k per root (alone: 2.1 against 2.6 ms)."""
        spans = []
        for d, s in zip(drafters, states):
            start = min(d.frontier, len(s.tokens) - 2)  # a second proposal for the same tokens redoes the root
            d.cache.truncate(start)
            spans.append((start, len(s.tokens) - 1))
        x, hidden = drafters[0]._pairs(states, spans)
        positions = torch.cat([torch.arange(a, b) for a, b in spans]).to(x.device)
        return cls._rows(drafters, x, hidden, positions, [b - a for a, b in spans], [None] * len(drafters),
                         newest_only=True)

    @classmethod
    @torch.inference_mode()
    def _propose_group(cls, drafters, states, max_depths) -> list[DraftTree]:
        """One forward for all roots, then one per tree depth over every sequence's frontier (attention per
        sequence over its own cache). A depth step costs the batch about the same time whatever its frontier, so
        where the engine knows the round's rate (``SequenceState.commit_rate``), the steps stop once the tokens the
        next one is expected to bring (:meth:`_Growth.step_gain`, all sequences' together) are worth less than its
        time: at batch 8 that is after a step or two, alone after the last. Like the engine's bar, that makes it a
        decision of the batch; without a rate, each tree is the one its sequence would get alone."""
        lengths = [len(s.tokens) for s in states]
        for d, s in zip(drafters, states):
            d.sampler = s.sampler
        out, logp = cls._roots(drafters, states)
        # every root's best children at once (a top-k and an id mapping per root took ~0.5 ms of a call at 8)
        scores, ids = topk_rows(logp, max(d.topk for d in drafters))
        scores, ids = scores.tolist(), drafters[0].model.to_target_ids(ids).tolist()
        growing: list[_Growth | None] = []
        for i, (d, s, n, max_depth) in enumerate(zip(drafters, states, lengths, max_depths)):
            d.frontier = n - 1
            depth = min(d.depth, max_depth)
            # the round's bar is on calibrated probabilities: floor the draft's own where they reach it
            floor = max(d.min_logp, math.log(d.estimates.least_raw(s.min_prob))) if s.min_prob > 0 else d.min_logp
            children = (scores[i][: d.topk], ids[i][: d.topk])  # the newest pair sits at position n-2
            growing.append(_Growth(d, out[i : i + 1], children, n - 2, depth, floor) if depth >= 1 else None)
        live = [g for g in growing if g is not None]
        clock, rate = drafters[0].step_clock, max(s.commit_rate for s in states)
        step = 1
        while live := [g for g in live if g.frontier and step < g.depth]:
            if sum(g.step_gain() for g in live) < clock(len(live)) * rate:
                break
            tic = time.perf_counter()
            inputs = [g.inputs() for g in live]
            counts = [len(g.frontier) for g in live]
            embeds = live[0].drafter.embed(torch.tensor([t for tokens, *_ in inputs for t in tokens],
                                                        device=out.device))
            residual = torch.cat([parent_out for _, parent_out, _ in inputs])
            x = live[0].drafter.model.midlayer.attention_input(embeds, residual)
            positions = torch.tensor([g.root_pos + step for g in live for _ in g.frontier], device=out.device)
            out, logp = cls._rows([g.drafter for g in live], x, residual, positions, counts,
                                  [mask.to(x.device) for *_, mask in inputs])
            for g, out_g, logp_g in zip(live, out.split(counts), logp.split(counts)):
                g.take(step, out_g, logp_g)
            clock.observe(len(live), time.perf_counter() - tic)
            step += 1
        trees = []
        for d, n, g in zip(drafters, lengths, growing):
            if g is None:
                trees.append(DraftTree())
                continue
            tree, d.last_scores = _best_subtree(g.nodes, d.budget, g.min_logp)
            d.cache.truncate(n - 1)
            trees.append(tree)
        return trees


class _Growth:
    """One sequence's EAGLE-2 dynamic tree while it grows: each step expands the ``topk`` best frontier nodes scoring
    at least ``min_logp`` (the drafter's floor, or the round's bar where that is stricter); at the end all nodes are
    reranked by cumulative log-prob (:func:`_best_subtree`)."""

    def __init__(self, drafter: Eagle3Drafter, root_out, children: tuple[list[float], list[int]], root_pos: int,
                 depth: int, min_logp: float):
        """``children``: the root's best children, log-probs and target ids, best first."""
        self.drafter, self.root_pos, self.depth, self.min_logp = drafter, root_pos, depth, min_logp
        scores, ids = children
        # every generated node: (score, depth, parent node index or -1, target token)
        self.nodes = [(score, 1, -1, token) for score, token in zip(scores, ids)]
        self.frontier = [i for i in range(len(self.nodes)) if self.nodes[i][0] >= min_logp]
        self.parent_out = root_out.expand(len(self.frontier), -1)
        self.top_conditional = math.exp(scores[0])  # the latest expanded nodes' best child's, on average
        self.rows: dict[int, int] = {}  # node -> its row in the draft cache once expanded
        self.committed = drafter.cache.get_seq_length()

    def inputs(self):
        """The frontier's tokens, their parents' outputs, and its attention mask ``[1, 1, F, cached + F]`` over the
        committed rows and each node's expanded ancestors (itself included)."""
        first_row = self.drafter.cache.get_seq_length()
        for offset, i in enumerate(self.frontier):
            self.rows[i] = first_row + offset
        mask = torch.zeros(len(self.frontier), first_row + len(self.frontier), dtype=torch.bool)
        mask[:, : self.committed] = True
        rows, columns = [], []
        for r, i in enumerate(self.frontier):
            j = i
            while j >= 0:
                rows.append(r)
                columns.append(self.rows[j])
                j = self.nodes[j][2]
        mask[rows, columns] = True
        return [self.nodes[i][3] for i in self.frontier], self.parent_out, mask[None, None]

    def take(self, step: int, out: torch.Tensor, logp: torch.Tensor) -> None:
        """The frontier's children from its rows' outputs; the next frontier is the ``topk`` best of them."""
        k, min_logp = self.drafter.topk, self.min_logp
        child_scores, child_ids = topk_rows(logp, k)
        self.top_conditional = float(child_scores[:, 0].exp().mean())
        child_scores = child_scores.cpu() + torch.tensor([self.nodes[i][0] for i in self.frontier])[:, None]
        child_tokens = self.drafter.model.to_target_ids(child_ids).tolist()
        first_child = len(self.nodes)
        scores = child_scores.tolist()
        for r, i in enumerate(self.frontier):
            self.nodes.extend((scores[r][c], step + 1, i, child_tokens[r][c]) for c in range(k))
        flat = child_scores.flatten()
        best = [b for b in flat.topk(min(k, flat.numel())).indices.tolist() if scores[b // k][b % k] >= min_logp]
        self.frontier = [first_child + b for b in best]
        self.parent_out = out[[b // k for b in best]]

    def step_gain(self) -> float:
        """The draft tokens expanding the frontier is expected to get accepted: each frontier node's best child,
        at the node's path probability times the best child's conditional one in the latest step, calibrated
        (``ProbCalibration``), where it clears the tree's floor."""
        estimates, floor = self.drafter.estimates, math.exp(self.min_logp)
        children = [math.exp(self.nodes[i][0]) * self.top_conditional for i in self.frontier]
        return sum(p * estimates.ratio(p) for p in children if p >= floor)


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
        probs=tuple(math.exp(nodes[i][0]) for i in order),  # a node's path probability under the draft
    )
    return tree, [nodes[i][0] for i in order]
