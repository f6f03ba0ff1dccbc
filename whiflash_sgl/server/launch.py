"""Running the reference server: its command-line flags, ``serve`` (the command), ``start_background`` (HTTP in a
thread).

Everything that can be wrong with the flags (a missing model, an unknown policy or algorithm, a bad config) fails
before the port is bound, with one line naming the problem.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

from whiflash_sgl.config import MATMUL_PRECISIONS
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.model_store import DEFAULT_MODEL
from whiflash_sgl.server.http import HttpLimits

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are local folders; never wait on a hub
DEFAULT_KV_BUDGET_MB = 1024  # target.DEFAULT_KV_BUDGET in MiB (not imported: parsing flags needs no torch)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The reference backend's flags, named as SGLang names them where SGLang has the same setting."""
    parser.add_argument("--model-path", default=DEFAULT_MODEL,
                        help=f"HF causal-LM folder, or '{DEFAULT_MODEL}' (the embedded default, with its committed "
                             f"drafters; default)")
    parser.add_argument("--speculative-algorithm", default=None, type=str.upper,
                        help="WHIFLASH (routing between EAGLE-3 and DFlash), or one drafter: EAGLE3, DFLASH, NGRAM; "
                             "omitted: plain decoding with the target")
    parser.add_argument("--whiflash-policy", default="heuristic", help="routing policy for WHIFLASH")
    parser.add_argument("--whiflash-config", help="YAML/JSON drafter and routing settings (whiflash_sgl/config.py)")
    parser.add_argument("--whiflash-policy-config", help="YAML/JSON parameters of the routing policy")
    parser.add_argument("--sampling-rule", default="keyed",
                        help="sampled requests: keyed (default; the text is a function of the seed, whatever the "
                             "method) or rejection (classic speculative sampling)")
    parser.add_argument("--served-model-name", help="the model name clients pass (default: --model-path)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--max-running-requests", type=int, default=16,
                        help="requests decoded together in the engine's batch (continuous batching; default: "
                             "%(default)s)")
    parser.add_argument("--kv-budget-mb", type=int, default=DEFAULT_KV_BUDGET_MB,
                        help="MiB of target KV cache (keys and values, all layers) shared by the running requests; "
                             "a request reserves its worst case when it joins the batch, and waits until that fits "
                             "(default: %(default)s)")
    parser.add_argument("--max-queued-requests", type=int, default=256,
                        help="requests allowed to wait for a place in the batch; more get HTTP 503 (a batch larger "
                             "than this gets 413)")
    limits = HttpLimits()
    parser.add_argument("--max-request-bytes", type=int, default=limits.max_request_bytes,
                        help="largest request body; a larger one gets HTTP 413 before it is read (default: 4 MiB)")
    parser.add_argument("--max-prompt-chars", type=int, default=limits.max_prompt_chars,
                        help="longest prompt in characters (chat: all messages), refused with HTTP 413 before it is "
                             "tokenized (default: %(default)s)")
    parser.add_argument("--max-header-bytes", type=int, default=limits.max_header_bytes,
                        help="largest request line and headers; larger gets HTTP 431 (default: 32 KiB)")
    parser.add_argument("--timeout-keep-alive", type=float, default=limits.timeout_keep_alive,
                        help="seconds an idle connection stays open (default: %(default)s)")
    parser.add_argument("--timeout-read", type=float, default=limits.timeout_read,
                        help="seconds to send a request's head once begun, and again its body; later gets HTTP 408 "
                             "(default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--matmul", choices=MATMUL_PRECISIONS, default="auto",
                        help="products in the target's linear layers: bfloat16 (AMX CPUs) or float32; auto (default): "
                             "bfloat16 where it runs")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def http_limits(args: argparse.Namespace) -> HttpLimits:
    """The HTTP server's limits, from parsed flags; raises :class:`WhiFlashError` for a bad one."""
    limits = HttpLimits(args.max_request_bytes, args.max_prompt_chars, args.max_header_bytes, args.timeout_keep_alive,
                        args.timeout_read)
    limits.check()
    return limits


def load_service(args: argparse.Namespace, limits: HttpLimits, engine_thread: bool = True):
    """The model and its service, from parsed flags; raises :class:`WhiFlashError` for any bad setting.
    ``engine_thread=False``: the caller runs the batch loop (``service.scheduler.run()``)."""
    import torch

    from whiflash_sgl.server.model import ServedModel
    from whiflash_sgl.server.service import Service

    if args.threads:
        torch.set_num_threads(args.threads)
    for flag in ("max_queued_requests", "max_running_requests", "kv_budget_mb"):
        if getattr(args, flag) < 1:
            raise WhiFlashError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    model = ServedModel.load(args.model_path, args.speculative_algorithm, args.whiflash_policy,
                             args.whiflash_config, args.whiflash_policy_config, args.served_model_name,
                             args.sampling_rule, args.matmul)
    model.target.set_kv_budget(args.kv_budget_mb << 20)
    return Service(model, args.max_queued_requests, limits.max_prompt_chars, args.max_running_requests,
                   engine_thread)


def serve(args: argparse.Namespace) -> int:
    """Load, then serve until SIGINT or SIGTERM; 2 with a one-line error when the settings are wrong.

    The batch loop runs on this thread, the one that loaded the model, and HTTP on a thread of its own: the engine
    must be the only thread that runs OpenMP regions (``Scheduler``'s ``own_thread``). A signal shuts HTTP down as
    uvicorn does (the requests under way finish, while the loop goes on serving them, then the loop ends); a second
    SIGINT leaves without waiting for them."""
    try:
        limits = http_limits(args)
        service = load_service(args, limits, engine_thread=False)
    except WhiFlashError as exc:
        print(f"launch_server: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    try:
        http = start_background(service, args.host, args.port, limits=limits, log_level=args.log_level,
                                graceful_timeout=None)
    except OSError as exc:
        print(f"launch_server: error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    model = service.model
    print(f"launch_server: serving {model.served_name} with the reference engine ({model.method.name}, batches of "
          f"up to {service.max_running} requests, {model.target.matmul} matmul) on {http.url}", file=sys.stderr)

    def on_signal(signum, frame) -> None:
        http.server.handle_exit(signum, frame)
        if http.server.force_exit:  # uvicorn then skips the application's shutdown, which would stop the loop
            service.scheduler.stop()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    service.scheduler.run()
    http.thread.join()
    return 0


@dataclass
class BackgroundServer:
    """HTTP served from a thread of this process (``serve``'s, tests', notebooks'); ``stop()`` shuts it down."""

    url: str
    service: object  # the Service it serves
    server: object
    thread: threading.Thread

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_background(service, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0,
                     limits: HttpLimits = HttpLimits(), log_level: str = "warning",
                     graceful_timeout: float | None = 5) -> BackgroundServer:
    """Serve ``service`` on ``host:port`` (0 = a free port) from a daemon thread; returns once it accepts. At
    shutdown, requests under way get ``graceful_timeout`` seconds to finish (None: as long as they take). Where the
    service's engine gets a thread of its own, the calling thread, taken to be the one that loaded the model, hands
    its OpenMP workers back first: beside them the engine's would sleep between parallel regions (``Scheduler``)."""
    import uvicorn

    from whiflash_sgl.server.app import build_app
    from whiflash_sgl.server.scheduler import release_openmp_workers

    family, *_, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    if service.scheduler.own_thread:
        release_openmp_workers()
    server = uvicorn.Server(uvicorn.Config(build_app(service, limits), log_level=log_level,
                                           timeout_graceful_shutdown=graceful_timeout,
                                           **limits.uvicorn_settings(service.metrics.count_response)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="whiflash-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the background server did not start")
        time.sleep(0.02)
    bound_host, bound_port = sock.getsockname()[:2]
    bound_host = f"[{bound_host}]" if family == socket.AF_INET6 else bound_host
    return BackgroundServer(f"http://{bound_host}:{bound_port}", service, server, thread)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m whiflash_sgl.server.launch",
                                     description="SGLang-compatible HTTP server on the WhiFlash reference engine")
    add_arguments(parser)
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
