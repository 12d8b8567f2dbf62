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
