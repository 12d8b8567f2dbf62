"""The shared-memory mask ring: what the scheduler writes into a slot is what a worker's reader maps, the
ring grows into a new file (readers follow the path), and closing removes the file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np

from radixserve.actors.mask_ring import PREFIX, SLOTS, MaskRing, MaskRingReader
from radixserve.actors.messages import MaskSlot, StepMask, WorkerInbox


def test_slots_are_shared_and_rotate(tmp_path: Path) -> None:
    ring = MaskRing.create(rows=4, words=5, directory=tmp_path)
    assert ring is not None
    reader = MaskRingReader()
    rng = np.random.default_rng(0)
    for step in range(2 * SLOTS):
        masks = rng.integers(-(2**31), 2**31, size=(3, 5)).astype(np.int32)
        ring.slot(step, 3)[:] = masks
        ref = ring.ref(step, 3)
        assert ref.slot == step % SLOTS
        assert np.array_equal(reader.read(ref), masks)
    held = reader.read(ring.ref(0, 3))  # a worker may still hold the last step's view when the ring grows
    bigger = MaskRing.create(rows=8, words=5, directory=tmp_path)
    assert bigger is not None and bigger.path != ring.path
    ring.close(unlink=True)
    bigger.slot(0, 8)[:] = 7
    assert np.array_equal(reader.read(bigger.ref(0, 8)), np.full((8, 5), 7, dtype=np.int32))
    assert held.shape == (3, 5) and int(held.sum()) == int(held.sum())  # still mapped
    reader.close()
    bigger.close(unlink=True)
    assert not Path(ring.path).exists() and not Path(bigger.path).exists()


def test_rings_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    orphan = tmp_path / f"{PREFIX}{dead.stdout.strip()}-abc"
    live = tmp_path / f"{PREFIX}{os.getpid()}-def"
    other = tmp_path / "something-else"
    for path in (orphan, live, other):
        path.write_bytes(b"x")
    ring = MaskRing.create(rows=2, words=3, directory=tmp_path)
    assert ring is not None and not orphan.exists() and live.exists() and other.exists()
    ring.close(unlink=True)


def test_no_room_means_no_ring(tmp_path: Path) -> None:
    assert MaskRing.create(rows=1, words=1, directory=tmp_path / "missing") is None
    assert MaskRing.create(rows=1 << 40, words=1 << 10, directory=tmp_path) is None


def test_step_mask_with_a_slot_round_trips() -> None:
    msg = StepMask(3, b"", MaskSlot("/dev/shm/x", 64, 10, 3, 5))
    payload = msgspec.msgpack.Encoder().encode(msg)
    assert msgspec.msgpack.Decoder(WorkerInbox).decode(payload) == msg
