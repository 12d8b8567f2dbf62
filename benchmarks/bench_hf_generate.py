"""The baseline: the same model through transformers `generate`, batch 1 and batch N, fixed output lengths.

    python -m radixserve.benchmarks.bench_hf_generate --batch-size 1 16 --input-len 128 --output-len 128
    python -m radixserve.benchmarks.bench_hf_generate --model-path .bench-models/llama-3.1-8b --dummy \
        --batch-size 1 32 --input-len 1024 --output-len 128

With no --model-path it loads the default model (SmolLM2 GGUF, dequantized by transformers). --dummy builds
the architecture of a config.json with random weights (as radixserve's load_format=dummy does). Greedy, no
EOS stop (min_new_tokens = max_new_tokens), random token-id prompts of equal length, so no padding is
involved.
"""

from __future__ import annotations

import argparse
import time

import torch

from radixserve.benchmarks.common import add_common_args, print_table, run_info, write_result
from radixserve.models.source import resolve_model_source


def load(model_path: str | None, dummy: bool, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    source = resolve_model_source(model_path, need_weights=not dummy)
    if source.kind == "gguf":
        model = AutoModelForCausalLM.from_pretrained(
            source.directory, gguf_file=source.path.name, dtype=dtype
        )
    elif dummy:
        config = AutoConfig.from_pretrained(source.path)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
    return model.to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--dummy", action="store_true", help="random weights from config.json")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    add_common_args(parser)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    model = load(args.model_path, args.dummy, dtype, args.device)
    vocab = model.config.vocab_size
    rows = []
    for bs in args.batch_size:
        ids = torch.randint(100, min(vocab, 30000), (bs, args.input_len), device=args.device)
        kw = dict(do_sample=False, max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                  attention_mask=torch.ones_like(ids), pad_token_id=0)
        with torch.inference_mode():
            model.generate(ids[:, :16], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = model.generate(ids, **kw)
            if args.device == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
        generated = (out.shape[1] - args.input_len) * bs
        rows.append({"batch_size": bs, "input_len": args.input_len, "output_len": args.output_len,
                     "seconds": elapsed, "output_tok_s": generated / elapsed})
    print_table(
        "transformers generate",
        [(f"batch {r['batch_size']} output tok/s", r["output_tok_s"]) for r in rows],
    )
    write_result(args.result_dir, run_info("bench_hf_generate", args), {"runs": rows})


if __name__ == "__main__":
    main()
