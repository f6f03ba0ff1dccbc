"""A load generator for a running server: output tokens/s and latency percentiles at several concurrencies.

``python -m whiflash_sgl.server.load --url http://127.0.0.1:30000 --concurrency 1,4,8 --requests 16``

At each concurrency C, C client threads send OpenAI chat completions (greedy, ``--max-new-tokens`` each) back to
back until ``--requests`` have completed. Output tokens/s is all completion tokens over the level's wall time;
latency is per request, send to last byte. ``/metrics`` before and after each level gives the server-side accept
length (generated tokens per target verify pass). Standard library only (urllib), besides the metrics parser.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from whiflash_sgl.jsonl import read_jsonl

DEFAULT_PROMPTS = [
    "Write a haiku about caches.",
    "Explain speculative decoding in two sentences.",
    "Write a Python function that returns the n-th Fibonacci number.",
    'Return a JSON object with keys "city" and "unit" for a weather query about Paris in celsius.',
    "What is 17 * 23? Show the steps.",
    "List three uses of a hash map.",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "Translate 'good morning, how are you?' into French.",
]


def _post(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _counters(base_url: str) -> dict[str, float]:
    with urllib.request.urlopen(base_url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels and s.name.endswith("_total")}


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def run_level(base_url: str, model: str, prompts: list[str], concurrency: int, requests: int,
              max_new_tokens: int, timeout: float) -> dict:
    lock = threading.Lock()
    next_index = 0
    latencies: list[float] = []
    tokens = errors = 0

    def client() -> None:
        nonlocal next_index, tokens, errors
        while True:
            with lock:
                if next_index >= requests:
                    return
                index, next_index = next_index, next_index + 1
            body = {"model": model, "temperature": 0, "max_tokens": max_new_tokens,
                    "messages": [{"role": "user", "content": prompts[index % len(prompts)]}]}
            tic = time.perf_counter()
            try:
                reply = _post(base_url + "/v1/chat/completions", body, timeout)
            except (urllib.error.URLError, OSError):
                with lock:
                    errors += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - tic)
                tokens += reply["usage"]["completion_tokens"]

    before = _counters(base_url)
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    tic = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - tic
    after = _counters(base_url)
    verify = after.get("whiflash_spec_verify_total", 0) - before.get("whiflash_spec_verify_total", 0)
    generated = after.get("whiflash_generation_tokens_total", 0) - before.get("whiflash_generation_tokens_total", 0)
    return {
        "concurrency": concurrency, "requests": len(latencies), "errors": errors, "seconds": round(wall, 3),
        "output_tokens": tokens, "output_tokens_per_s": round(tokens / wall, 2) if wall else 0.0,
        "latency_p50_s": round(percentile(latencies, 0.5), 3) if latencies else None,
        "latency_p95_s": round(percentile(latencies, 0.95), 3) if latencies else None,
        "latency_mean_s": round(statistics.fmean(latencies), 3) if latencies else None,
        "accept_length": round(generated / verify, 3) if verify else None,
        "latencies_s": [round(x, 3) for x in latencies],  # in completion order
    }


def format_table(rows: list[dict]) -> str:
    lines = ["| concurrency | requests | output tok/s | p50 latency s | p95 latency s | accept length |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['output_tokens_per_s']} | {r['latency_p50_s']} | "
                     f"{r['latency_p95_s']} | {r['accept_length'] if r['accept_length'] is not None else '-'} |")
    return "\n".join(lines)


def _prompts(path: str | None) -> list[str]:
    """User turns of a bench-format JSONL file (``{"messages": [...]}`` per line), or the built-in set."""
    if not path:
        return DEFAULT_PROMPTS
    return [next(m["content"] for m in row["messages"] if m["role"] == "user") for row in read_jsonl(path)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m whiflash_sgl.server.load", description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", help="bench-format JSONL (its first user turns); default: a built-in set")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per request")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1 or args.requests < 1:
        parser.error("--concurrency needs positive client counts and --requests a positive count")
    base_url = args.url.rstrip("/")
    try:
        model = json.loads(urllib.request.urlopen(base_url + "/v1/models", timeout=30).read())["data"][0]["id"]
        prompts = _prompts(args.prompts)
        run_level(base_url, model, prompts, 1, 1, args.max_new_tokens, args.timeout)  # warm-up
        rows = [run_level(base_url, model, prompts, c, args.requests, args.max_new_tokens, args.timeout)
                for c in levels]
    except (urllib.error.URLError, OSError) as exc:
        print(f"load: error: cannot reach {base_url}: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"url": base_url, "model": model, "max_new_tokens": args.max_new_tokens,
                                              "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
