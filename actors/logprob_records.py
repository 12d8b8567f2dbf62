"""Turn a StepResult's raw logprob arrays into TokenLogprob records (scheduler side, no tensors)."""

from __future__ import annotations

import numpy as np

from radixserve.actors.messages import PromptLogprobs, StepResult
from radixserve.outputs import TokenLogprob


def token_logprobs_of_rows(result: StepResult, rows: list[int]) -> dict[int, TokenLogprob]:
    if not rows or not result.logprobs:
        return {}
    lps = np.frombuffer(result.logprobs, dtype="<f4")
    k = result.top_k
    ids = np.frombuffer(result.top_ids, dtype="<i4").reshape(-1, k) if k else None
    tops = np.frombuffer(result.top_logprobs, dtype="<f4").reshape(-1, k) if k else None
    tokens = np.frombuffer(result.tokens, dtype="<i4")
    out = {}
    for b in rows:
        top = None
        if ids is not None and tops is not None:
            top = list(zip(ids[b].tolist(), tops[b].tolist(), strict=True))
        out[b] = TokenLogprob(int(tokens[b]), float(lps[b]), top)
    return out


def append_prompt_logprobs(out: list[TokenLogprob | None], prompt_ids: list[int], p: PromptLogprobs) -> None:
    """Entry i of `out` is prompt token i's logprob given tokens before it; chunks arrive in order."""
    lps = np.frombuffer(p.logprobs, dtype="<f4")
    ids = np.frombuffer(p.top_ids, dtype="<i4").reshape(len(lps), p.top_k) if p.top_k else None
    tops = np.frombuffer(p.top_logprobs, dtype="<f4").reshape(len(lps), p.top_k) if p.top_k else None
    for i in range(len(lps)):
        top = None
        if ids is not None and tops is not None:
            top = list(zip(ids[i].tolist(), tops[i].tolist(), strict=True))
        out.append(TokenLogprob(prompt_ids[len(out)], float(lps[i]), top))
