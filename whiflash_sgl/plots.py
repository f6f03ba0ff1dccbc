"""Figures next to a bench report: acceptance along one sequence per paradigm with the router's and the oracle's
choices, tokens/s per category by method, and (a concurrency report) tokens/s against the concurrency level.
matplotlib is imported only here (the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path

from whiflash_sgl.errors import WhiFlashError

COLORS = {"eagle3": "tab:blue", "dflash": "tab:orange", "ngram": "tab:green"}
HEDGE_COLOR = "tab:purple"  # any action of several paradigms verified together


def _color(action: str) -> str:
    return HEDGE_COLOR if "+" in action else COLORS.get(action, "gray")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise WhiFlashError("--plot needs matplotlib: pip install 'whiflash-sgl[plot]'") from exc
    return plt


def _round_starts(accept_lengths: list[int], first: int = 1) -> list[int]:
    """Generated-token position at which each round starts (the prefill emits the first token)."""
    starts, position = [], first
    for accepted in accept_lengths:
        starts.append(position)
        position += accepted + 1
    return starts


def _best_changes(run: dict) -> int:
    """How often the paradigm with the longest acceptance changes along an oracle run."""
    best = [max(a, key=a.get) for a in run["paradigm_accepts"]]
    return sum(x != y for x, y in zip(best, best[1:]))


def plot_routing(report: dict, path: Path) -> Path | None:
    """For the oracle prompt where the best paradigm changes most often: each paradigm's would-be accepted length
    per oracle round, the oracle's pick, and the router's choices along the same token positions."""
    runs = report["per_prompt"]
    oracles = [r for r in runs if r["method"] == "oracle" and r["paradigm_accepts"]]
    if not oracles:
        return None
    oracle = max(oracles, key=_best_changes)
    routed = [r for r in runs if r["method"].startswith("whiflash:") and r["prompt_id"] == oracle["prompt_id"]]
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    starts = _round_starts(oracle["accept_lengths"])[: len(oracle["paradigm_accepts"])]
    for paradigm in sorted(oracle["paradigm_accepts"][0]):
        top.plot(starts, [a[paradigm] for a in oracle["paradigm_accepts"]], "-o", ms=3,
                 color=COLORS.get(paradigm), label=f"{paradigm} (would accept)")
    top.set_ylabel("accepted draft tokens")
    top.set_title(f"Acceptance along one sequence: {oracle['prompt_id']} ({oracle['category']})")
    top.legend(loc="upper right", fontsize=8)
    lanes = [("oracle", oracle)] + [(r["method"], r) for r in routed]
    for lane, (label, run) in enumerate(lanes):
        xs = _round_starts(run["accept_lengths"])[: len(run["paradigms"])]
        bottom.scatter(xs, [lane] * len(xs), c=[_color(p) for p in run["paradigms"]], s=14, marker="s")
    bottom.set_yticks(range(len(lanes)), [label for label, _ in lanes], fontsize=8)
    bottom.set_xlabel("generated token position")
    bottom.set_title("paradigm chosen per round (purple: a hedge, several paradigms' drafts verified as one)",
                     fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_throughput(report: dict, path: Path) -> Path:
    """Grouped bars: tokens/s per category for every method."""
    plt = _pyplot()
    rows = report["results"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    categories = list(dict.fromkeys(r["category"] for r in rows))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(categories)), 4))
    for i, method in enumerate(methods):
        values = {r["category"]: r["tokens_per_s"] or 0 for r in rows if r["method"] == method}
        ax.bar([c + i * width for c in range(len(categories))], [values.get(c, 0) for c in categories], width,
               label=method)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(categories))], categories)
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{report['model']}, {report['threads']} threads, {report['max_new_tokens']} new tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_concurrency(report: dict, path: Path) -> Path:
    """Throughput (the ``all`` rows) against the concurrency level, one line per method."""
    plt = _pyplot()
    rows = [r for r in report["results"] if r["category"] == "all"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["concurrency"], r["tokens_per_s"] or 0) for r in rows if r["method"] == method)
        ax.plot([c for c, _ in points], [t for _, t in points], "-o", ms=4, label=method)  # colours as the bars
    levels = report["concurrency"]
    if len(levels) > 1 and max(levels) / min(levels) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrency (requests in flight)")
    ax.set_ylabel("tokens/s (all requests)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{report['model']}, {report['threads']} threads, {report['max_new_tokens']} new tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(report: dict, out_json: Path) -> list[Path]:
    """The figures of a report next to ``out_json``: a concurrency report's throughput curve as ``<stem>.png``;
    otherwise ``<stem>_throughput.png`` and, with an oracle run, ``<stem>_routing.png``."""
    if "concurrency" in report:
        return [plot_concurrency(report, out_json.with_suffix(".png"))]
    stem = out_json.with_suffix("")
    written = [plot_throughput(report, stem.with_name(stem.name + "_throughput.png"))]
    routing = plot_routing(report, stem.with_name(stem.name + "_routing.png"))
    return written + ([routing] if routing else [])
