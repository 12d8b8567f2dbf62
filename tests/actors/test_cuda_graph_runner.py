"""Which batch sizes get CUDA graphs (actors/cuda_graph_runner.py); capture itself needs a GPU."""

from __future__ import annotations

from radixserve.actors.cuda_graph_runner import capture_sizes, cascade_capture_sizes


def test_plain_sizes_up_to_the_limit() -> None:
    assert capture_sizes(256)[:6] == [1, 2, 4, 8, 16, 24] and capture_sizes(256)[-1] == 256
    assert capture_sizes(20) == [1, 2, 4, 8, 16]
    assert capture_sizes(0) == [0]


def test_cascade_sizes_start_past_the_plain_family_and_end_at_the_row_limit() -> None:
    assert cascade_capture_sizes(256, 1024) == [384, 512, 640, 768, 896, 1024]
    assert cascade_capture_sizes(256, 1025) == [384, 512, 640, 768, 896, 1024, 1025]
    assert cascade_capture_sizes(256, 300) == [300]
    assert cascade_capture_sizes(256, 256) == [] and cascade_capture_sizes(256, 100) == []


class _FakeGraphs:
    """Stands in for CudaGraphRunner's sizes and staging (capture needs a GPU): plain graphs up to 4 rows,
    cascade graphs up to 128."""

    def __init__(self) -> None:
        self.staged: list[tuple[str, int, object]] = []

    def padded_size(self, num_rows: int) -> int | None:
        return 4 if num_rows <= 4 else None

    def cascade_size(self, num_rows: int) -> int | None:
        return 128 if 4 < num_rows <= 128 else None

    def stage(self, positions: object, out_slots: object, req_rows: object, seq_lens: object,
              seq_lens_cpu: tuple[int, ...]) -> int:
        self.staged.append(("plain", len(seq_lens_cpu), None))
        return 4

    def stage_cascade(self, positions: object, out_slots: object, req_rows: object, seq_lens: object,
                      plan: object) -> int:
        self.staged.append(("cascade", len(seq_lens), plan))  # type: ignore[arg-type]
        return 128


def _decode_plan(step: int, seq_lens: list[int], shared: list[int]) -> object:
    import numpy as np

    from radixserve.actors.messages import StepPlan

    b = len(seq_lens)
    i32 = lambda xs: np.asarray(xs, dtype="<i4").tobytes()  # noqa: E731
    return StepPlan(
        step=step, req_rows=i32(range(b)), seq_lens=i32(seq_lens), extend_lens=i32([1] * b),
        prev_rows=i32([-1] * b), sample_mask=np.ones(b, dtype="u1").tobytes(), output_lens=i32([0] * b),
        input_ids=i32([5] * b), out_slots=i32(range(1, b + 1)), shared_lens=i32(shared),
    )


def test_model_runner_stages_big_shared_prefix_decode_steps_into_cascade_graphs() -> None:
    import torch

    from radixserve.actors.model_runner import ModelRunner
    from radixserve.memory.kv_pool import ReqToTokenTable
    from radixserve.ops.sampler import Sampler

    graphs = _FakeGraphs()
    runner = ModelRunner(None, None, ReqToTokenTable(64, 2048, "cpu"), Sampler(100, (0,), "cpu"), None,
                         torch.device("cpu"), graphs)  # type: ignore[arg-type]
    # 40 rows in two groups of 20 sharing 1,000 tokens: cascade pays, a cascade graph of 128 rows
    seq = [1010] * 40
    shared = [0 if r % 20 == 0 else 1000 for r in range(40)]
    prep = runner.prepare(_decode_plan(0, seq, shared))  # type: ignore[arg-type]
    assert (prep.graph_size, prep.graph_cascade) == (128, True)
    kind, rows, plan = graphs.staged[-1]
    assert (kind, rows) == ("cascade", 40) and plan.group_starts == (0, 20, 40)  # type: ignore[attr-defined]
    # nothing shared: an eager step of plain decode; few rows: the plain graph
    prep = runner.prepare(_decode_plan(1, seq, [0] * 40))  # type: ignore[arg-type]
    assert (prep.graph_size, prep.graph_cascade) == (None, False) and len(graphs.staged) == 1
    prep = runner.prepare(_decode_plan(2, [1010] * 3, [0, 1000, 1000]))  # type: ignore[arg-type]
    assert (prep.graph_size, prep.graph_cascade) == (4, False) and graphs.staged[-1][0] == "plain"
