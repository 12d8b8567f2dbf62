from __future__ import annotations

import numpy as np
import pytest
import torch

from radixserve.memory.kv_pool import KVCache, ReqToTokenTable, SlotAllocator


def test_allocator_sizes_and_padding_slot() -> None:
    alloc = SlotAllocator(8)
    assert alloc.total_size == 7
    assert alloc.available_size == 7
    slots = alloc.alloc(7)
    assert slots is not None and slots.dtype == np.int32
    assert sorted(slots.tolist()) == list(range(1, 8))  # slot 0 is never handed out
    assert alloc.available_size == 0
    alloc.check_integrity()


def test_allocator_too_small() -> None:
    with pytest.raises(ValueError, match="at least 2 slots"):
        SlotAllocator(1)


def test_alloc_lowest_ids_first_and_zero() -> None:
    alloc = SlotAllocator(10)
    first = alloc.alloc(3)
    assert first is not None and first.tolist() == [1, 2, 3]
    empty = alloc.alloc(0)
    assert empty is not None and len(empty) == 0 and empty.dtype == np.int32
    assert alloc.available_size == 6


def test_alloc_exhaustion_returns_none_and_takes_nothing() -> None:
    alloc = SlotAllocator(5)
    assert alloc.alloc(3) is not None
    assert alloc.alloc(2) is None
    assert alloc.available_size == 1
    assert alloc.alloc(1) is not None
    assert alloc.alloc(1) is None


def test_free_returns_slots_for_reuse() -> None:
    alloc = SlotAllocator(6)
    a = alloc.alloc(5)
    assert a is not None
    alloc.free(a[:2])
    alloc.free([])
    assert alloc.available_size == 2
    b = alloc.alloc(2)
    assert b is not None and set(b.tolist()) == set(a[:2].tolist())
    alloc.free(a[2:].tolist())  # a plain sequence works too
    alloc.free(b)
    assert alloc.available_size == 5
    alloc.check_integrity()


def test_reset_restores_everything() -> None:
    alloc = SlotAllocator(6)
    assert alloc.alloc(4) is not None
    alloc.reset()
    assert alloc.available_size == 5
    alloc.check_integrity()


def test_check_integrity_catches_double_free() -> None:
    alloc = SlotAllocator(6)
    slots = alloc.alloc(2)
    assert slots is not None
    alloc.free(slots)
    alloc.free(slots[:1])
    with pytest.raises(AssertionError, match="twice"):
        alloc.check_integrity()


@pytest.mark.parametrize("bad", [0, 6, -1])
def test_check_integrity_catches_out_of_range(bad: int) -> None:
    alloc = SlotAllocator(6)
    assert alloc.alloc(1) is not None
    alloc.free([bad])
    with pytest.raises(AssertionError, match="out of range"):
        alloc.check_integrity()


def test_kv_cache_store() -> None:
    layers, slots_n, heads, dim = 2, 8, 2, 4
    cache = KVCache(layers, slots_n, heads, dim, torch.float16, "cpu")
    assert len(cache.k_buffers) == len(cache.v_buffers) == layers
    assert cache.k_buffers[0].shape == (slots_n, heads, dim) and cache.k_buffers[0].dtype == torch.float16
    slots = torch.tensor([3, 5, 1], dtype=torch.int64)
    k = torch.randn(3, heads, dim, dtype=torch.float32)  # cast to the cache dtype on store
    v = torch.randn(3, heads, dim, dtype=torch.float32)
    cache.store(1, slots, k, v)
    torch.testing.assert_close(cache.k_buffers[1][slots], k.half())
    torch.testing.assert_close(cache.v_buffers[1][slots], v.half())
    untouched = torch.tensor([0, 2, 4, 6, 7])
    assert not cache.k_buffers[1][untouched].any() and not cache.v_buffers[1][untouched].any()
    assert not cache.k_buffers[0].any() and not cache.v_buffers[0].any()  # other layers untouched


def test_kv_cache_bytes_per_slot() -> None:
    assert KVCache.bytes_per_slot(3, 2, 64, torch.bfloat16) == 2 * 3 * 2 * 64 * 2
    assert KVCache.bytes_per_slot(1, 1, 8, torch.float32) == 2 * 8 * 4


def test_req_to_token_write() -> None:
    table = ReqToTokenTable(max_rows=3, max_context=5, device="cpu")
    # rows padded to 16 columns: the row stride the attention kernels are compiled for at start-up
    assert table.table.shape == (3, 16) and table.table.dtype == torch.int32 and table.max_context == 5
    rows = torch.tensor([0, 0, 2, 1])
    positions = torch.tensor([0, 1, 4, 2])
    slots = torch.tensor([7, 8, 9, 10], dtype=torch.int64)  # cast to int32 on write
    table.write(rows, positions, slots)
    expected = torch.zeros(3, 16, dtype=torch.int32)
    expected[0, 0], expected[0, 1], expected[2, 4], expected[1, 2] = 7, 8, 9, 10
    assert torch.equal(table.table, expected)
    table.write(torch.tensor([0]), torch.tensor([1]), torch.tensor([11], dtype=torch.int32))
    assert table.table[0, 1].item() == 11
