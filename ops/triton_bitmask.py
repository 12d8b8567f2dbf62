"""Grammar bitmasks applied to logits in one Triton kernel: rows[g] of logits keeps only the tokens that
bitmask[g] allows (xgrammar's packed layout: bit j of int32 word w is token 32 w + j).

The torch version (ops/token_bitmask.py) expands every bit into an int32 and round-trips the rows through
index_select / index_copy: about 5 passes over [G, V] float32. This kernel reads each logit's word once (a
cached gather) and writes only the masked logits, in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048  # logits per program: 64 words of the mask


@triton.jit
def _apply_bitmask_kernel(
    Logits, Rows, Bitmask,
    stride_logits, stride_bitmask, vocab_size,
    BLOCK: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = cols < vocab_size
    row = tl.load(Rows + g).to(tl.int64)
    words = tl.load(Bitmask + g * stride_bitmask + cols // 32, mask=in_vocab, other=0)
    allowed = (words >> (cols % 32)) & 1  # an arithmetic shift still leaves bit 31 in the lowest place
    tl.store(Logits + row * stride_logits + cols, float("-inf"), mask=in_vocab & (allowed == 0))


def apply_token_bitmask_triton(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Mask `logits` [B, V] in place: row rows[g] keeps only the tokens bitmask[g] [G, W] allows."""
    G, W = bitmask.shape
    V = logits.shape[1]
    if logits.stride(1) != 1 or bitmask.stride(1) != 1:
        raise ValueError(
            f"logits and bitmask need unit last strides, got {logits.stride()}, {bitmask.stride()}"
        )
    if G == 0:
        return
    _apply_bitmask_kernel[(G, triton.cdiv(V, BLOCK))](
        logits, rows, bitmask, logits.stride(0), bitmask.stride(0), V, BLOCK=BLOCK, num_warps=4,
    )
