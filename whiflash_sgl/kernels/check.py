"""Self-check: every tree-attention backend available here against per-request SDPA, on random ragged tree batches.

``python -m whiflash_sgl.kernels.check [--device cpu|cuda] [--seed N]`` prints, per backend, dtype and case, the
largest absolute difference from the oracle and the time per ``run`` call (one attention layer over the batch), and
exits 1 if any difference exceeds the tolerance of its dtype. The oracle is ``F.scaled_dot_product_attention`` called
request by request in float32 with the request's explicit dense ``[q_len, kv_len]`` mask and the KV heads repeated
for grouped-query attention, on the very (rounded) inputs the backend saw, so only the backend's own error counts.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backends import available_backends, get_backend
from .layout import AttentionLayout
from .tree_batch import TreeBatch

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class Case:
    """A family of random batches: tree shape, prefix lengths, heads."""

    name: str
    shape: str  # "chain", "wide" or "random"
    nodes: tuple[int, int]  # tree sizes drawn from this range (inclusive)
    prefix: tuple[int, int]
    num_qo_heads: int
    num_kv_heads: int
    causal: bool = False


def cases(device: torch.device) -> list[Case]:
    """Modest sizes on CPU (the whole check takes seconds); realistic ones on CUDA."""
    if device.type == "cuda":
        return [
            Case("chains", "chain", (1, 16), (16, 512), 32, 8),
            Case("wide-trees", "wide", (32, 64), (16, 512), 32, 8),
            Case("random-trees-mha", "random", (0, 64), (16, 512), 16, 16),
            Case("long-prefix-gqa", "random", (16, 64), (1024, 4096), 32, 4),
            Case("causal-blocks", "chain", (15, 15), (64, 2048), 32, 8, causal=True),
        ]
    return [
        Case("chains", "chain", (1, 8), (4, 64), 4, 2),
        Case("wide-trees", "wide", (8, 24), (4, 64), 4, 2),
        Case("random-trees-mha", "random", (0, 24), (4, 64), 4, 4),
        Case("long-prefix-gqa", "random", (8, 24), (1024, 2048), 8, 2),
        Case("causal-blocks", "chain", (7, 7), (16, 256), 4, 2, causal=True),
    ]


def random_parents(num_nodes: int, shape: str, rng: random.Random) -> list[int]:
    """Parents of a topologically ordered tree: a chain, a wide shallow tree, or a uniformly random one."""
    if shape == "chain":
        return list(range(-1, num_nodes - 1))
    if shape == "wide":
        return [rng.randint(-1, min(i, 3) - 1) for i in range(num_nodes)]
    return [rng.randint(-1, i - 1) for i in range(num_nodes)]


def random_layout(case: Case, batch_size: int, rng: random.Random, device: torch.device) -> AttentionLayout:
    """A ragged verify batch for ``case``; one request of a tree-shaped case has an empty tree (its root only)."""
    sizes = [rng.randint(*case.nodes) for _ in range(batch_size)]
    if case.shape != "chain":
        sizes[rng.randrange(batch_size)] = 0
    trees = TreeBatch.from_lists([random_parents(n, case.shape, rng) for n in sizes], device=device)
    layout = trees.attention_layout([rng.randint(*case.prefix) for _ in range(batch_size)])
    return AttentionLayout(layout.qo_indptr, layout.kv_indptr) if case.causal else layout


def sdpa_oracle(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: AttentionLayout, scale: float
) -> torch.Tensor:
    """Float32 SDPA request by request with the dense mask, GQA by repeating KV heads: ``[total_q, Hq, Dv]``."""
    group = query.shape[1] // key.shape[1]
    outputs = []
    for i in range(layout.batch_size):
        q = query[int(layout.qo_indptr[i]) : int(layout.qo_indptr[i + 1])].float().transpose(0, 1)
        kv_rows = slice(int(layout.kv_indptr[i]), int(layout.kv_indptr[i + 1]))
        k = key[kv_rows].float().repeat_interleave(group, dim=1).transpose(0, 1)
        v = value[kv_rows].float().repeat_interleave(group, dim=1).transpose(0, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.request_mask(i), scale=scale)
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs)


def _timed(fn, device: torch.device, repeats: int) -> tuple[object, float]:
    """The result of ``fn()`` and the median wall time of ``repeats`` calls, in milliseconds."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return result, sorted(times)[len(times) // 2] * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m whiflash_sgl.kernels.check", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, help="timed run() calls per measurement (default: 5 on CPU, 20 on CUDA)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    batch_size, head_dim, repeats = (16, 128, 20) if device.type == "cuda" else (4, 64, 5)
    repeats = args.repeats or repeats
    other_device = "cpu" if device.type == "cuda" else "flashinfer"
    names = [name for name in available_backends() if name != other_device]

    print(f"tree-attention self-check on {device} (torch {torch.__version__}), seed {args.seed}, "
          f"batch {batch_size}, head_dim {head_dim}; backends: {', '.join(names)}")
    print("tolerance (max abs error vs float32 SDPA): "
          + ", ".join(f"{str(d).removeprefix('torch.')} {t:g}" for d, t in TOLERANCE.items()))
    header = f"{'backend':<11}{'dtype':<10}{'case':<18}{'heads':>6}{'q_rows':>8}{'kv_rows':>9}" \
             f"{'max_abs_err':>13}{'plan_ms':>9}{'run_ms':>9}  ok"
    print(header)
    failures = 0
    for case in cases(device):
        layout = random_layout(case, batch_size, rng, device)
        total_q, total_kv = int(layout.qo_indptr[-1]), int(layout.kv_indptr[-1])
        scale = head_dim**-0.5
        q32 = torch.randn(total_q, case.num_qo_heads, head_dim, device=device)
        k32 = torch.randn(total_kv, case.num_kv_heads, head_dim, device=device)
        v32 = torch.randn(total_kv, case.num_kv_heads, head_dim, device=device)
        for name in names:
            backend = get_backend(name, device=device)
            for dtype in backend.dtypes():
                q, k, v = q32.to(dtype), k32.to(dtype), v32.to(dtype)
                plan, plan_ms = _timed(lambda: backend.plan(
                    layout, num_qo_heads=case.num_qo_heads, num_kv_heads=case.num_kv_heads, head_dim=head_dim,
                    scale=scale, dtype=dtype), device, 1)
                out, run_ms = _timed(lambda: plan.run(q, k, v), device, repeats)
                error = (out.float() - sdpa_oracle(q, k, v, layout, scale)).abs().max().item()
                ok = error <= TOLERANCE[dtype]
                failures += not ok
                heads = f"{case.num_qo_heads}/{case.num_kv_heads}"
                print(f"{name:<11}{str(dtype).removeprefix('torch.'):<10}{case.name:<18}{heads:>6}{total_q:>8}"
                      f"{total_kv:>9}{error:>13.2e}{plan_ms:>9.2f}{run_ms:>9.2f}  {'yes' if ok else 'NO'}")
    print("all checks passed" if not failures else f"{failures} check(s) FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
