"""The ``whiflash`` command: prepare, generate, bench."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from whiflash_sgl.config import ATTENTION_PATHS, MATMUL_PRECISIONS
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.model_store import DEFAULT_MODEL

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are local folders; never wait on a hub

DEFAULT_METHODS = "vanilla,ngram"
# meaningless with --endpoint
ENGINE_ONLY = ("config", "policy_config", "threads", "dtype", "matmul", "device", "attention")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"HF causal-LM folder, or '{DEFAULT_MODEL}' (default)")
    p.add_argument("--config", help="YAML/JSON file of drafter and routing settings (whiflash_sgl/config.py)")
    p.add_argument("--policy-config", help="YAML/JSON file of parameters for the whiflash:<policy> method")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0, help="64-bit seed of sampled runs (the bench adds the prompt index)")
    p.add_argument("--sampling-rule", default="keyed",
                   help="T > 0: keyed (default; the text is a function of the seed, the same for every method) or "
                        "rejection (classic speculative sampling: same distribution, text depends on the drafts)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="target weights (bfloat16 is ~2x faster on CPUs with AVX512-BF16/AMX, but not batch-invariant)")
    p.add_argument("--matmul", choices=MATMUL_PRECISIONS, default="auto",
                   help="products in a float32 target's linear layers: bfloat16 (summed in float32, on CPUs with "
                        "AMX or AVX512-BF16; the checkpoint's own precision, and a verify pass's extra rows cheap) or "
                        "float32; auto (default): bfloat16 where it runs")
    p.add_argument("--device", default="cpu", help="where the target and drafters run: cpu (default) or cuda")
    p.add_argument("--attention", choices=ATTENTION_PATHS, default="auto",
                   help="target attention: a whiflash_sgl.kernels backend (auto: FlashInfer on CUDA, else the "
                        "PyTorch reference) or 'direct' (the reference without planning)")


def _load_target(args):
    import torch

    from whiflash_sgl.target import Target

    return Target.load(args.model or DEFAULT_MODEL, dtype=getattr(torch, args.dtype), attention=args.attention,
                       device=args.device, matmul=args.matmul)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="whiflash", description="WhiFlash speculative decoding, reference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help=f"build the cached HF folder of the embedded default ({DEFAULT_MODEL})")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")

    p = sub.add_parser("generate", help="generate for one prompt; the text streams to stdout, statistics to stderr")
    p.add_argument("--prompt", required=True, help="one user turn; the chat template is applied")
    p.add_argument("--system", help="optional system message")
    p.add_argument("--raw", action="store_true", help="use the prompt as raw text, without the chat template")
    p.add_argument("--method", default="vanilla")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    _add_common(p)

    p = sub.add_parser("bench", help="compare methods on a JSONL prompt set; prints a table and writes JSON")
    p.add_argument("--prompts", required=True, help="JSONL: {id, category, messages} per line")
    p.add_argument("--categories", help="comma-separated categories to keep")
    p.add_argument("--limit", type=int, help="prompts per category")
    p.add_argument("--methods", help=f"comma-separated methods (default: {DEFAULT_METHODS}; with --endpoint: the "
                                     f"endpoints' labels)")
    p.add_argument("--endpoint", action="append", metavar="[METHOD=]URL",
                   help="bench a running SGLang-API server (whiflash_sgl.launch_server or sglang.launch_server) "
                        "instead of the reference engine; repeat it, one server per method, 'vanilla' being the "
                        "reference for identical/speedup; plain URLs take --methods in order. --model then only "
                        "picks the tokenizer (default: the servers' /model_info)")
    p.add_argument("--concurrency", metavar="C1,C2,...",
                   help="comma-separated concurrency levels, e.g. 1,4,8,16: per method and level a closed loop "
                        "keeps that many requests in flight on one batched engine (with --endpoint: that many "
                        "streaming client threads) and reports throughput, TTFT and ITL percentiles")
    p.add_argument("--paired", action="store_true",
                   help="with --concurrency: run every method of a level at once, in turns of a few seconds of "
                        "engine rounds each (bench.TURN_SECONDS), each timed on a clock that runs only in its own "
                        "rounds, so a drift of the host's speed falls on all methods alike (throughput and "
                        "latencies as if each ran alone)")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--plot", action="store_true", help="also write PNG figures next to --out")
    p.add_argument("--resume", action="store_true",
                   help="with --concurrency: go on with an interrupted bench of the same settings and prompts, "
                        "running only the (method, level) runs its log next to --out (.levels.jsonl) lacks")
    _add_common(p)
    p.set_defaults(engine_defaults={dest: p.get_default(dest) for dest in ENGINE_ONLY})

    from whiflash_sgl.train.train_drafter import add_arguments

    p = sub.add_parser("collect-traces", help="run the oracle on training prompts, record router features and "
                                              "what every paradigm would have accepted each round")
    p.add_argument("--prompts", required=True, help="training prompts JSONL (never the evaluation sets)")
    p.add_argument("--limit", type=int, help="number of prompts (seeded shuffle)")
    p.add_argument("--out", required=True, help="traces JSONL (appended)")
    _add_common(p)

    p = sub.add_parser("train-policy", help="train the MLP routing policy on collected traces")
    p.add_argument("--traces", required=True)
    p.add_argument("--out", required=True, help="policy folder (config.json + model.safetensors)")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hedges", default="", help="comma-separated hedges the MLP may also choose, each paradigms "
                                                "joined by '+' (e.g. eagle3+ngram): drafted together, verified as one "
                                                "tree")

    p = sub.add_parser("cost-curve", help="measure the target's forward time against rows and sequences per forward "
                                                 "(JSON, PNG)")
    p.add_argument("--out", required=True, help="curve JSON; the plot goes next to it as .png")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per shape (the median is kept)")
    _add_common(p)

    p = sub.add_parser("train-drafter", help="train an EAGLE-3 or DFlash drafter on the target's own outputs")
    add_arguments(p)
    p.add_argument("--model", default=DEFAULT_MODEL, help="target model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    return parser


def _setup(args):
    import torch

    from whiflash_sgl.config import WhiFlashConfig, read_mapping
    from whiflash_sgl.sampling import SamplingParams, check_seed

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.sampling_rule)
    except ValueError as exc:
        raise WhiFlashError(str(exc)) from exc
    check_seed(args.seed)
    config = WhiFlashConfig.from_file(args.config) if args.config else WhiFlashConfig()
    if args.max_new_tokens < 1:
        raise WhiFlashError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    policy_params = read_mapping(args.policy_config) if args.policy_config else None
    return sampling, config, policy_params


def _generate(args) -> None:
    from whiflash_sgl.chat import encode_chat
    from whiflash_sgl.methods import make_method

    sampling, config, policy_params = _setup(args)
    if not args.prompt.strip():
        raise WhiFlashError("--prompt is empty")
    target = _load_target(args)
    method = make_method(args.method, target, config, policy_params)
    if args.raw:
        ids = target.tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        ids = encode_chat(target.tokenizer, [*messages, {"role": "user", "content": args.prompt}])
    streaming = args.method not in ("hf-generate", "hf-prompt-lookup")

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = method.generate(ids, args.max_new_tokens, sampling, args.seed, stop=args.stop,
                             on_text=write if streaming else None)
    if not streaming:
        write(result.text)
    sys.stdout.write("\n")
    print(
        f"[{args.method}] {len(result.tokens)} tokens in {result.seconds:.2f}s "
        f"({len(result.tokens) / result.seconds:.1f} tok/s), tau {result.tau:.2f} over {result.rounds} rounds, "
        f"finish: {result.finish_reason}",
        file=sys.stderr,
    )


def _method_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    methods = [m.strip() for m in text.split(",") if m.strip()]
    twice = sorted({m for m in methods if methods.count(m) > 1})
    if twice:
        raise WhiFlashError(f"--methods names {', '.join(twice)} more than once")
    return methods


def _levels(text: str | None) -> list[int] | None:
    """``--concurrency``: distinct positive integers."""
    if text is None:
        return None
    try:
        levels = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1 or len(set(levels)) != len(levels):
        raise WhiFlashError(f"--concurrency takes distinct positive integers separated by commas (e.g. 1,4,8,16), "
                            f"got {text!r}")
    return levels


def _bench_engine(args, prompts) -> dict:
    from whiflash_sgl.bench import run_bench

    sampling, config, policy_params = _setup(args)
    methods = _method_list(args.methods or DEFAULT_METHODS)
    levels = _levels(args.concurrency)
    return run_bench(_load_target(args), prompts, methods, args.max_new_tokens, sampling, args.seed, config,
                     policy_params=policy_params, levels=levels, log=_level_log(args), paired=args.paired)


def _bench_endpoints(args, prompts) -> dict:
    from whiflash_sgl.bench_endpoint import parse_endpoints, run_endpoint_bench

    if args.paired:
        raise WhiFlashError("--paired takes turns between the reference engine's runs of a level; servers run on "
                            "their own: bench them without it")
    given = [f"--{d.replace('_', '-')}" for d in ENGINE_ONLY if getattr(args, d) != args.engine_defaults[d]]
    if given:
        raise WhiFlashError(f"--endpoint measures running servers, which {', '.join(given)} (reference-engine "
                            f"settings) cannot reach: give the servers their settings when you start them")
    endpoints = parse_endpoints(args.endpoint, _method_list(args.methods))
    sampling, _, _ = _setup(args)
    levels = _levels(args.concurrency)
    return run_endpoint_bench(endpoints, prompts, args.max_new_tokens, sampling, args.seed, args.model,
                              levels=levels, log=_level_log(args))


def _level_log(args):
    """A concurrency bench writing --out keeps a log of its finished runs, which --resume reads back."""
    from whiflash_sgl.bench_log import LevelLog, log_path

    if args.resume and not (args.concurrency and args.out):
        raise WhiFlashError("--resume goes on with a --concurrency bench from the log next to its --out: give both")
    return LevelLog(log_path(args.out), args.resume) if args.concurrency and args.out else None


def _write_report(report: dict, out: str | None, plot: bool) -> None:
    from whiflash_sgl.bench import format_table

    print(format_table(report))
    if out:
        Path(out).write_text(json.dumps(report, indent=1))
        print(f"wrote {out}", file=sys.stderr)
    if plot:
        from whiflash_sgl.plots import write_plots

        for path in write_plots({"threads": "server", **report}, Path(out)):  # endpoints report no threads
            print(f"wrote {path}", file=sys.stderr)


def _bench(args) -> None:
    from whiflash_sgl.chat import load_prompts

    if args.plot and not args.out:
        raise WhiFlashError("--plot writes figures next to the JSON report: give --out too")
    categories = [c.strip() for c in args.categories.split(",")] if args.categories else None
    prompts = load_prompts(args.prompts, categories, args.limit)
    report = _bench_endpoints(args, prompts) if args.endpoint else _bench_engine(args, prompts)
    _write_report(report, args.out, args.plot)


def _cost_curve(args) -> None:
    import torch

    from whiflash_sgl.cost_curve import measure, plot

    _setup(args)
    target = _load_target(args)
    curve = measure(target, repeats=args.repeats)
    threads = torch.get_num_threads()
    out = Path(args.out)
    curve.save(out, model=target.name, device=str(target.device), matmul=target.matmul, threads=threads,
               command="whiflash " + " ".join(sys.argv[1:]))
    png = plot(curve, out.with_suffix(".png"), f"{target.name}: one target forward, {threads} threads")
    for sequences, rows, seconds in zip(curve.sequences, curve.rows, curve.seconds):
        print(f"{sequences:3d} sequences {rows:4d} rows  {1000 * seconds:8.1f} ms  {1000 * seconds / rows:7.2f} ms/row")
    print(f"wrote {out} and {png}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "prepare":
            from whiflash_sgl.model_store import prepare_default_model

            print(prepare_default_model(force=args.force))
        elif args.command == "generate":
            _generate(args)
        elif args.command == "collect-traces":
            from whiflash_sgl.train.router_policy import collect_traces

            _, config, _ = _setup(args)
            rows = collect_traces(_load_target(args), Path(args.prompts), Path(args.out), config, args.limit,
                                  args.max_new_tokens, args.seed)
            print(f"wrote {rows} rounds to {args.out}", file=sys.stderr)
        elif args.command == "train-policy":
            from whiflash_sgl.train.router_policy import train_policy

            hedges = [h for h in args.hedges.split(",") if h]
            print(json.dumps(train_policy(Path(args.traces), Path(args.out), args.epochs, args.hidden, args.seed,
                                          hedges), indent=1))
        elif args.command == "cost-curve":
            _cost_curve(args)
        elif args.command == "train-drafter":
            import torch

            from whiflash_sgl.train.train_drafter import run

            if args.threads:
                torch.set_num_threads(args.threads)
            print(json.dumps(run(args), indent=1))
        else:
            _bench(args)
    except WhiFlashError as exc:
        print(f"whiflash: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
