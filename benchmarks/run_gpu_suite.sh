#!/usr/bin/env bash
# The benchmark suite on a GPU machine, stage by stage; every stage writes its JSON under $OUT.
#
#   bash benchmarks/run_gpu_suite.sh [STAGE ...]      stages: model one_batch offline profile serving
#                                                     (default: all, in that order)
# Environment: MODEL (a random_model config, default llama-3.1-8b), MODEL_DIR (default /tmp/rs-$MODEL),
# GEN_DEVICE (where the random weights are drawn, default cuda), OUT (result folder), RADIXSERVE_GIT_COMMIT
# (the commit, when the tree has no .git), EXTRA (more engine flags for offline / profile / serving, e.g.
# "--disable-cuda-graph").
# A stage of an 8B model takes 1-4 minutes on an H100 once FlashInfer's kernels are compiled (the first
# engine start compiles them: about 1 minute, cached under FLASHINFER_WORKSPACE_BASE).
set -euo pipefail

MODEL=${MODEL:-llama-3.1-8b}
MODEL_DIR=${MODEL_DIR:-/tmp/rs-$MODEL}
export OUT=${OUT:-bench_results}
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-$PWD/.fi-cache}
EXTRA=${EXTRA:-}
PORT=${PORT:-30000}
BENCH="python3 -m radixserve.benchmarks"
STAGES=${*:-model one_batch offline profile serving}
mkdir -p "$OUT"

for stage in $STAGES; do
  echo "=== $stage ($MODEL) ==="
  case $stage in
    model)
      [ -f "$MODEL_DIR/model.safetensors.index.json" ] \
        || $BENCH.random_model --config "$MODEL" --out "$MODEL_DIR" --device "${GEN_DEVICE:-cuda}" ;;
    one_batch)
      $BENCH.bench_one_batch --model-path "$MODEL_DIR" --batch-size 1 8 32 64 --input-len 1024 --output-len 32 ;;
    offline)
      # shellcheck disable=SC2086
      $BENCH.bench_offline --model-path "$MODEL_DIR" --num-prompts 512 --random-input-len 1024 \
        --random-output-len 256 --random-range-ratio 0.5 $EXTRA
      # shellcheck disable=SC2086
      $BENCH.bench_offline --model-path "$MODEL_DIR" --dataset-name generated-shared-prefix \
        --gsp-num-groups 32 --gsp-prompts-per-group 16 $EXTRA ;;
    profile)
      # shellcheck disable=SC2086
      $BENCH.profile_decode --model-path "$MODEL_DIR" --batch-size 64 --input-len 1024 --output-len 256 \
        --torch-profile-steps 32 $EXTRA ;;
    serving)
      # shellcheck disable=SC2086
      python3 -m radixserve.launch_server --model-path "$MODEL_DIR" --port "$PORT" $EXTRA > "$OUT/server.log" 2>&1 &
      server=$!
      trap 'kill $server 2>/dev/null || true' EXIT
      for _ in $(seq 600); do
        python3 -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$PORT/health').status_code != 200)" \
          2>/dev/null && break
        kill -0 $server 2>/dev/null || { tail -50 "$OUT/server.log"; exit 1; }
        sleep 1
      done
      for rate in 4 16 inf; do
        $BENCH.bench_serving --port "$PORT" --dataset-name random --num-prompts 256 --random-input-len 1024 \
          --random-output-len 256 --random-range-ratio 0.5 --request-rate "$rate"
      done
      $BENCH.bench_serving --port "$PORT" --backend openai --dataset-name sharegpt-synthetic --num-prompts 256 \
        --max-concurrency 32
      kill $server; wait $server || true
      trap - EXIT ;;
    *)
      echo "unknown stage $stage (stages: model one_batch offline profile serving)" >&2; exit 2 ;;
  esac
done
