"""python -m radixserve.generate "prompt": stream one chat answer from the default (or a given) model."""

from __future__ import annotations

import argparse
import sys

import anyio

from radixserve.engine import Engine


async def _main(args: argparse.Namespace) -> None:
    async with Engine(args.model_path) as engine:
        params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
        async for delta in engine.stream(
            messages=[{"role": "user", "content": args.prompt}], sampling_params=params
        ):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        sys.stdout.write("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description="Stream a chat answer from radixserve")
    parser.add_argument("prompt")
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    anyio.run(_main, parser.parse_args(), backend_options={"use_uvloop": True})


if __name__ == "__main__":
    main()
