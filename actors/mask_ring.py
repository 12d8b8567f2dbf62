"""Grammar bitmasks from a scheduler to the workers of its group through shared memory, not the socket.

At batch 64 and a 128k vocabulary a step's masks are 1 MB, and they sit on the critical path of constrained
decoding (the step in flight waits for them before sampling): through the socket they were copied five times
(tobytes, msgpack, send, receive, decode), which cost ~2 ms a step on a 2-core host. Here the scheduler fills
them straight into a file mapping under /dev/shm and the StepMask names the slot; a worker copies the slot
into pinned memory for the device.

A ring of SLOTS slots, step s in slot s % SLOTS. Reuse is safe: the scheduler fills slot s % SLOTS for step s
only after applying step s - 1's result, and every rank has copied the masks of step s - SLOTS out of the
ring by then (it copies a step's masks before launching the next step, and step s - 1 cannot complete
before all ranks have launched it: its all-reduces wait for them).

Workers on other nodes cannot map the file: their groups send masks in the message (`MaskRing.create`
returns None where shared memory is unavailable, too). The engine removes its rings at shutdown; rings of an
engine that was killed are removed by the next one that makes a ring.
"""

from __future__ import annotations

import mmap
import os
import uuid
from pathlib import Path

import numpy as np

from radixserve.actors.messages import MaskSlot

SLOTS = 4
SHM_DIR = Path("/dev/shm")
PREFIX = "radixserve-masks-"  # then the creating process's pid: files of dead processes are removed


def remove_orphans(directory: Path) -> None:
    """Remove the rings of engines that died without closing them (the file outlives its process)."""
    for path in directory.glob(f"{PREFIX}*"):
        try:
            pid = int(path.name[len(PREFIX):].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            continue  # not ours, or another user's live process


class MaskRing:
    def __init__(self, path: str, rows: int, words: int, create: bool) -> None:
        self.path, self.rows, self.words = path, rows, words
        size = SLOTS * rows * words * 4
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._slots = np.frombuffer(self._map, dtype=np.int32).reshape(SLOTS, rows, words)

    @classmethod
    def create(cls, rows: int, words: int, directory: Path = SHM_DIR) -> MaskRing | None:
        """A new ring for `rows` masks per step, or None when `directory` lacks room or does not exist."""
        try:
            stat = os.statvfs(directory)
        except OSError:
            return None
        remove_orphans(directory)
        if stat.f_bavail * stat.f_frsize < 2 * SLOTS * rows * words * 4:
            return None
        return cls(str(directory / f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex}"), rows, words, create=True)

    def slot(self, step: int, num_rows: int) -> np.ndarray:
        """The first `num_rows` masks of `step`'s slot: [num_rows, words] int32, writable."""
        assert num_rows <= self.rows, (num_rows, self.rows)
        return self._slots[step % SLOTS, :num_rows]

    def ref(self, step: int, num_rows: int) -> MaskSlot:
        return MaskSlot(self.path, self.rows, self.words, step % SLOTS, num_rows)

    def close(self, unlink: bool = False) -> None:
        """Drop the mapping (it unmaps once no view of it is left: a caller may still hold a slot's view) and,
        with `unlink`, the file (mappings of it stay valid)."""
        del self._slots
        if unlink:
            Path(self.path).unlink(missing_ok=True)


class MaskRingReader:
    """A worker's side: maps the ring a MaskSlot names (anew when the scheduler replaced it by a larger
    one)."""

    def __init__(self) -> None:
        self._ring: MaskRing | None = None

    def read(self, ref: MaskSlot) -> np.ndarray:
        ring = self._ring
        if ring is None or ring.path != ref.path:  # the previous ring unmaps when its last view goes
            ring = self._ring = MaskRing(ref.path, ref.capacity, ref.words, create=False)
        return ring._slots[ref.slot, : ref.num_rows]

    def close(self) -> None:
        self._ring = None
