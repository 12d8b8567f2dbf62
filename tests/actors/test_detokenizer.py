"""The detokenizer actor: a request opened with stream=False is decoded once, at its finish, into the same
output the streaming path produces."""

from __future__ import annotations

from typing import Any

import anyio

from radixserve.actors.detokenizer import Detokenizer
from radixserve.actors.mailbox import mailbox
from radixserve.actors.messages import (
    DetokenizerInbox,
    IngressInbox,
    RegisterRequest,
    RequestOutput,
    RequestUpdate,
    SchedulerInbox,
    TokenBatch,
    merge_outputs,
)
from radixserve.outputs import FinishReason, TokenLogprob
from radixserve.sampling_params import SamplingParams

TEXT = " Héllo wörld, 東京 is a city 🙂 of many words spread over several updates."


def _outputs(tokenizer: Any, stream: bool, params: SamplingParams) -> list[RequestOutput]:
    prompt = tokenizer.encode("Tell me")
    ids = tokenizer.encode(TEXT)
    chunks = [ids[i : i + 3] for i in range(0, len(ids), 3)]

    async def main() -> list[RequestOutput]:
        to_detok, detok_inbox = mailbox(DetokenizerInbox, 64)
        to_ingress, ingress_inbox = mailbox(IngressInbox, 64)
        to_scheduler, _ = mailbox(SchedulerInbox, 8)
        detok = Detokenizer(tokenizer, detok_inbox, to_ingress, to_scheduler)
        await to_detok.send(RegisterRequest("r", prompt, params, 0, stream))
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            logprobs = [TokenLogprob(t, -0.5) for t in chunk]
            await to_detok.send(TokenBatch([RequestUpdate(
                "r", chunk, logprobs, FinishReason.LENGTH if last else None, cached_tokens=2)]))
        to_detok.close()
        await detok.run()
        return [out for batch in ingress_inbox.drain() for out in batch.outputs]

    return anyio.run(main)


def test_a_non_streaming_request_gets_one_output_equal_to_the_streamed_ones(smollm_tokenizer: Any) -> None:
    params = SamplingParams(logprobs=0)
    streamed = _outputs(smollm_tokenizer, True, params)
    once = _outputs(smollm_tokenizer, False, params)
    assert len(streamed) > 5 and len(once) == 1
    assert once[0] == merge_outputs(streamed)
    assert once[0].text == TEXT and once[0].finish_reason == FinishReason.LENGTH
    assert once[0].usage is not None and once[0].usage.completion_tokens == len(smollm_tokenizer.encode(TEXT))


def test_stop_strings_keep_a_non_streaming_request_incremental(smollm_tokenizer: Any) -> None:
    outs = _outputs(smollm_tokenizer, False, SamplingParams(stop=["city"]))
    assert outs[-1].finish_reason == FinishReason.STOP and outs[-1].matched_stop == "city"
    assert "".join(o.text for o in outs) == " Héllo wörld, 東京 is a "
