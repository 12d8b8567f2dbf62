"""Online serving metrics, defined exactly as SGLang's bench_serving (`calculate_metrics`) defines them.

Per successful request (times from sending the request):

    ttft      arrival of the first chunk that carries output tokens
    latency   arrival of the last chunk (end to end)
    itl       gaps between chunks after the first; a chunk with k new tokens adds k gaps of (gap / k)
    tpot      (latency - ttft) / (output_len - 1), for output_len > 1 (the first token excluded)

Over the run (duration: first request sent to last response finished): request, input, output and total
throughput; mean / median / std / p99 of TTFT, TPOT and E2E latency; mean / median / std / p95 / p99 / max of
ITL (all gaps of all requests pooled); concurrency = sum(latency) / duration. Failed requests count as 0
output tokens and are left out of the latency statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class RequestOutcome:
    prompt_len: int
    success: bool = False
    output_len: int = 0
    ttft: float = 0.0  # seconds
    latency: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)  # seconds
    generated_text: str = ""
    error: str = ""


@dataclass(frozen=True, slots=True)
class ServingMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input: int
    total_output: int
    request_throughput: float
    input_throughput: float
    output_throughput: float
    total_throughput: float
    mean_ttft_ms: float
    median_ttft_ms: float
    std_ttft_ms: float
    p99_ttft_ms: float
    mean_tpot_ms: float
    median_tpot_ms: float
    std_tpot_ms: float
    p99_tpot_ms: float
    mean_itl_ms: float
    median_itl_ms: float
    std_itl_ms: float
    p95_itl_ms: float
    p99_itl_ms: float
    max_itl_ms: float
    mean_e2e_latency_ms: float
    median_e2e_latency_ms: float
    std_e2e_latency_ms: float
    p99_e2e_latency_ms: float
    concurrency: float


def _ms(values: list[float]) -> np.ndarray:
    # SGLang: `np.mean(x or 0)`: an empty list (no streaming, or every request failed) reads as 0.
    return np.asarray(values or [0.0], dtype=np.float64) * 1000.0


def calculate_metrics(outcomes: list[RequestOutcome], duration_s: float) -> ServingMetrics:
    ok = [o for o in outcomes if o.success]
    total_input = sum(o.prompt_len for o in ok)
    total_output = sum(o.output_len for o in ok)
    ttfts = _ms([o.ttft for o in ok])
    tpots = _ms([(o.latency - o.ttft) / (o.output_len - 1) for o in ok if o.output_len > 1])
    itls = _ms([gap for o in ok for gap in o.itl])
    e2e = _ms([o.latency for o in ok])
    return ServingMetrics(
        completed=len(ok),
        failed=len(outcomes) - len(ok),
        duration_s=duration_s,
        total_input=total_input,
        total_output=total_output,
        request_throughput=len(ok) / duration_s,
        input_throughput=total_input / duration_s,
        output_throughput=total_output / duration_s,
        total_throughput=(total_input + total_output) / duration_s,
        mean_ttft_ms=float(ttfts.mean()),
        median_ttft_ms=float(np.median(ttfts)),
        std_ttft_ms=float(ttfts.std()),
        p99_ttft_ms=float(np.percentile(ttfts, 99)),
        mean_tpot_ms=float(tpots.mean()),
        median_tpot_ms=float(np.median(tpots)),
        std_tpot_ms=float(tpots.std()),
        p99_tpot_ms=float(np.percentile(tpots, 99)),
        mean_itl_ms=float(itls.mean()),
        median_itl_ms=float(np.median(itls)),
        std_itl_ms=float(itls.std()),
        p95_itl_ms=float(np.percentile(itls, 95)),
        p99_itl_ms=float(np.percentile(itls, 99)),
        max_itl_ms=float(itls.max()),
        mean_e2e_latency_ms=float(e2e.mean()),
        median_e2e_latency_ms=float(np.median(e2e)),
        std_e2e_latency_ms=float(e2e.std()),
        p99_e2e_latency_ms=float(np.percentile(e2e, 99)),
        concurrency=float(sum(o.latency for o in ok)) / duration_s,
    )
