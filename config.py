"""Frozen, validated configuration. `EngineConfig` is what `Engine(...)` and launch_server's flags build.

Every field is either honoured or rejected at start-up: a feature that is not built raises
UnsupportedFeatureError here, never silently does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from radixserve.errors import UnsupportedFeatureError

# The KV pool's element types (ops/kv_dtype.py maps them to torch dtypes): the model's dtype, or FP8.
KV_CACHE_DTYPES = ("auto", "fp8_e5m2", "fp8_e4m3")

SchedulePolicy = Literal["lpm", "fcfs", "priority"]
_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model_path: str | None = None  # None: the default model (SmolLM2-135M-Instruct, GGUF)
    load_format: str = "auto"  # "dummy": random weights, config.json and tokenizer only (benchmarks)
    served_model_name: str | None = None
    tokenizer_path: str | None = None
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on the CPU
    device: str = "auto"  # auto: cuda when available, else cpu
    context_length: int | None = None  # None: the model's max_position_embeddings
    # KV pool: max_total_tokens wins over mem_fraction_static when set.
    mem_fraction_static: float | None = None  # None: 0.85 on CUDA; the CPU uses cpu_kv_gib
    max_total_tokens: int | None = None
    cpu_kv_gib: float = 2.0
    # Scheduling.
    schedule_policy: SchedulePolicy = "lpm"
    chunked_prefill_size: int = 8192  # token budget of one step (prefill chunks + one per decode row)
    max_prefill_tokens: int = 16384  # prompt tokens admitted in one step at most
    max_running_requests: int = 256
    max_queued_requests: int | None = None  # None: unbounded waiting queue
    disable_radix_cache: bool = False
    disable_overlap_schedule: bool = False
    new_token_ratio: float = 0.7  # initial share of max_new_tokens reserved for each running request
    min_new_token_ratio: float = 0.1
    disable_jump_forward: bool = False  # constrained decoding: decode forced text token by token
    # GPU path.
    attention_backend: str = "auto"  # auto: flashinfer on CUDA, torch on the CPU
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int = 256  # SGLang's H100 default; larger decode steps run eagerly
    disable_custom_all_reduce: bool = False  # TP on GPUs: NCCL for every all-reduce (no one-shot path)
    # TP on GPUs: each row-parallel layer's all-reduce, the residual add and the RMSNorm after it in one
    # kernel (FlashInfer's build of TensorRT-LLM's fused all-reduce; ops/allreduce_norm.py)
    enable_flashinfer_allreduce_fusion: bool = False
    enable_torch_compile: bool = False
    quantization: str | None = None
    kv_cache_dtype: str = "auto"  # the KV pool's element type: auto (the model's dtype), fp8_e5m2, fp8_e4m3
    # Parallelism: dp_size replicas (each a scheduler and its own KV pool) of tp_size worker processes each.
    tp_size: int = 1
    dp_size: int = 1
    # Data-parallel routing (actors/router.py): a request goes to the replica holding the longest prefix of it
    # (at least dp_cache_threshold of the prompt) unless that replica has more than dp_balance_threshold
    # outstanding requests above the least loaded one, which gets it otherwise.
    dp_balance_threshold: int = 32
    dp_cache_threshold: float = 0.3
    # Tensor parallelism across hosts: node 0 runs the engine and ranks 0..tp/nnodes-1; node k runs ranks
    # k*tp/nnodes.. as `python -m radixserve.actors.worker_node`. dist_init_addr "HOST:PORT" is node 0:
    # torch.distributed meets on PORT, the workers of other nodes fetch their step plans from PORT + 1.
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None
    # Misc.
    random_seed: int | None = None
    chat_template: str | None = None
    log_requests: bool = False
    worker_start_timeout: float = 600.0
    # The engine gc.freeze()s its process once started, so that full collections skip the start-up heap, and
    # makes full collections 10x rarer; an app embedding the engine that must collect cycles among objects
    # it built before, or keep the default thresholds, may turn that off.
    # (Worker processes are the engine's own: they always freeze.)
    disable_gc_freeze: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.schedule_policy not in ("lpm", "fcfs", "priority"):
            raise ValueError(f"schedule_policy must be lpm, fcfs or priority, got {self.schedule_policy!r}")
        if self.mem_fraction_static is not None and not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")
        for name in (
            "chunked_prefill_size", "max_prefill_tokens", "max_running_requests", "cuda_graph_max_bs"
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_total_tokens is not None and self.max_total_tokens < 2:
            raise ValueError(f"max_total_tokens must be >= 2, got {self.max_total_tokens}")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {self.context_length}")
        for name in ("tp_size", "dp_size", "nnodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dp_balance_threshold < 0 or not 0.0 <= self.dp_cache_threshold <= 1.0:
            raise ValueError("dp_balance_threshold must be >= 0 and dp_cache_threshold in [0, 1]")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes={self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1:
            if self.tp_size % self.nnodes:
                raise ValueError(f"tp_size ({self.tp_size}) must be a multiple of nnodes ({self.nnodes})")
            if self.dp_size != 1:
                raise UnsupportedFeatureError("data parallelism across nodes (--dp-size > 1, --nnodes > 1)")
            if self.dist_init_addr is None:
                raise ValueError("--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address)")
            self.dist_init_endpoint()  # validates it
        if self.quantization is not None:
            raise UnsupportedFeatureError(f"quantization {self.quantization!r} is not built yet")
        if self.enable_flashinfer_allreduce_fusion and (self.tp_size == 1 or self.nnodes > 1):
            raise ValueError("enable_flashinfer_allreduce_fusion fuses the all-reduces of tensor parallelism "
                             "on one host: it needs tp_size > 1 and nnodes 1")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {self.kv_cache_dtype!r}")
        if self.enable_torch_compile:
            raise UnsupportedFeatureError("--enable-torch-compile is not built yet")
        if self.attention_backend not in ("auto", "torch", "flashinfer", "triton"):
            raise UnsupportedFeatureError(
                f"attention backend {self.attention_backend!r} is not built "
                "(available: flashinfer, triton, torch)"
            )

    def dist_init_endpoint(self) -> tuple[str, int]:
        """(host, port) of --dist-init-addr; port + 1 is node 0's listener for the other nodes' workers."""
        host, sep, port = (self.dist_init_addr or "").rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65535:
            raise ValueError(f"dist_init_addr must be HOST:PORT (PORT < 65535), got {self.dist_init_addr!r}")
        return host.strip("[]"), int(port)
