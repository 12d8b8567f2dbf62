"""The engine requests behind one HTTP request: P prompts x n samples, opened together, read together, closed
together.

Member `index` is the OpenAI choice index: prompt_i * n + j. Every member is opened before anything is read,
so a bad prompt (or a full queue) refuses the whole HTTP request and the members opened before it are
aborted. `run()` reads all members concurrently and hands their outputs, in arrival order, to one consumer.
`aclose()` aborts whatever has not finished: a disconnect, an error or a cancelled consumer leaks no KV.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectSendStream

from radixserve.actors.ingress import RequestHandle
from radixserve.actors.messages import RequestOutput
from radixserve.errors import EngineDeadError, RequestAbortedError
from radixserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from radixserve.engine import Engine


@dataclass(frozen=True, slots=True)
class Prompt:
    """What one engine request is given: exactly one of text, token ids or chat messages."""

    text: str | None = None
    input_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class Member:
    index: int
    prompt_index: int
    sample_index: int
    handle: RequestHandle


class RequestGroup:
    def __init__(self, engine: Engine, gid: str, registry: dict[str, RequestGroup]) -> None:
        self.engine = engine
        self.gid = gid
        self.members: list[Member] = []
        self._registry = registry

    @classmethod
    async def open(
        cls,
        engine: Engine,
        gid: str,
        registry: dict[str, RequestGroup],
        prompts: Sequence[Prompt],
        params: Sequence[SamplingParams],
        n: int,
        rids: Sequence[str] | None = None,
        stream: bool = True,
    ) -> RequestGroup:
        """Open len(prompts) * n requests; `params[i]` serves prompt i, and sample j of a seeded request
        gets seed + j. Engine request ids: `rids[i]` (the caller's, one per prompt) or `gid`, suffixed with
        the sample (or choice) index when there are several. Raises what `Engine.open` raises, after
        aborting the members already opened. stream=False: each member gives one output, at its finish."""
        assert len(params) == len(prompts) and n >= 1
        assert rids is None or len(rids) == len(prompts)
        group = cls(engine, gid, registry)
        total = len(prompts) * n
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
                for j in range(n):
                    index = i * n + j
                    if rids is not None:
                        rid = rids[i] if n == 1 else f"{rids[i]}-{j}"
                    else:
                        rid = gid if total == 1 else f"{gid}-{index}"
                    sample = p if p.seed is None else _with_seed(p, p.seed + j)
                    handle = await engine.open(
                        prompt.text, sample, input_ids=prompt.input_ids, messages=prompt.messages, rid=rid,
                        stream=stream,
                    )
                    group.members.append(Member(index, i, j, handle))
        except BaseException:
            await group.aclose()
            raise
        registry[gid] = group
        return group

    async def run(self, consume: Callable[[Member, RequestOutput], Awaitable[None]]) -> None:
        """Feed every member's outputs to `consume`, one at a time, until all have finished. An engine
        failure (EngineDeadError, RequestAbortedError) stops everything and is raised here."""
        send, receive = anyio.create_memory_object_stream[tuple[Member, RequestOutput | Exception]](math.inf)
        failure: Exception | None = None
        async with anyio.create_task_group() as tg:
            for member in self.members:
                tg.start_soon(self._pump, member, send.clone())
            send.close()
            async with receive:
                async for member, item in receive:
                    if isinstance(item, Exception):
                        failure = item
                        tg.cancel_scope.cancel()
                        break
                    await consume(member, item)
        if failure is not None:
            raise failure

    async def _pump(self, member: Member, send: MemoryObjectSendStream[tuple[Member, Any]]) -> None:
        async with send:
            try:
                async for out in self.engine.outputs(member.handle):
                    await send.send((member, out))
            except (EngineDeadError, RequestAbortedError) as e:
                await send.send((member, e))

    async def abort(self) -> None:
        for member in self.members:
            if not member.handle.finished:
                # NOTE: a stopped engine cannot take the abort, and has nothing left to free either.
                with contextlib.suppress(Exception):
                    await self.engine.abort(member.handle.rid)

    async def aclose(self) -> None:
        """Abort the members that have not finished (aborting twice is harmless) and forget the group.
        Shielded: it runs when the caller is being cancelled, which is when it matters most."""
        self._registry.pop(self.gid, None)
        with anyio.CancelScope(shield=True):
            await self.abort()


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return msgspec.structs.replace(params, seed=seed)
