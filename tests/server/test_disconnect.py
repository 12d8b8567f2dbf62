"""Clients that go away abort their requests: after 50 streams cut off mid-way (and a few non-streaming
requests timed out), the idle server holds no KV slot: free + cached == total, held == 0."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest

from tests.server.conftest import Server

NUM_STREAMS = 50
LONG = {"max_tokens": 300, "ignore_eos": True, "stream": True}


def body(i: int, model: str) -> tuple[str, dict[str, Any]]:
    """Completions, chat and native streams in turn, with distinct prompts (no two share a cache entry)."""
    match i % 3:
        case 0:
            return "/v1/completions", {"model": model, "prompt": f"Story number {i}:", **LONG}
        case 1:
            return "/v1/chat/completions", {
                "model": model,
                **LONG,
                "messages": [{"role": "user", "content": f"Tell story {i}."}],
            }
        case _:
            return "/generate", {
                "text": f"Poem number {i}:",
                "stream": True,
                "sampling_params": {"max_new_tokens": 300, "ignore_eos": True},
            }


async def wait_idle(client: httpx.AsyncClient) -> dict[str, int]:
    """The pool stats once nothing runs, waits or holds KV (or after 60 s, for the asserts to show)."""
    with anyio.move_on_after(60):
        while True:
            stats = (await client.get("/get_server_info")).json()["pool_stats"]
            if stats["running_requests"] == 0 and stats["waiting_requests"] == 0 and stats["held"] == 0:
                return stats
            await anyio.sleep(0.1)
    return (await client.get("/get_server_info")).json()["pool_stats"]


async def test_disconnects_leak_nothing(server: Server, model: str) -> None:
    received = [0] * NUM_STREAMS
    limits = httpx.Limits(max_connections=NUM_STREAMS + 10)
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:

        async def cut_off(i: int) -> None:
            path, payload = body(i, model)
            async with client.stream("POST", path, json=payload) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        received[i] += 1
                        if received[i] >= 2 + i % 3:
                            break  # leaving the block closes the connection mid-stream

        async def time_out(i: int) -> None:
            path, payload = body(i, model)
            with pytest.raises(httpx.ReadTimeout):
                await client.post(path, json={**payload, "stream": False}, timeout=1.0)

        async with anyio.create_task_group() as tg:
            for i in range(NUM_STREAMS):
                tg.start_soon(cut_off, i)
            for i in range(3):
                tg.start_soon(time_out, NUM_STREAMS + i)

    assert all(n >= 2 for n in received)
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        stats = await wait_idle(client)
        assert stats["running_requests"] == 0 and stats["waiting_requests"] == 0
        assert stats["held"] == 0, stats
        assert stats["free"] + stats["cached"] == stats["total"], stats
        # And the server goes on serving.
        out = await client.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2})
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 2
