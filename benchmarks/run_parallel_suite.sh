#!/usr/bin/env bash
# Multi-GPU runs (tensor and data parallelism) and their one-GPU baselines, stage by stage, on one host; and
# the one-GPU runs of the constrained-decoding and shared-prefix targets.
#
#   bash benchmarks/run_parallel_suite.sh STAGE ...
#
# stages (each needs the GPUs it names):
#   allreduce       bench_all_reduce: NCCL vs one-shot, world 2 (and 4)
#   latency_llama   batch-1 decode at input 1024, Llama-3.1-8B: TP1, TP2, TP2 NCCL-only, TP4
#   latency_qwen    the same for Qwen2-7B: TP1, TP2, TP4
#   latency_tp1     Llama batch-1 decode, TP1 only (one GPU)
#   tp2_fused       bench_all_reduce --fused-norm, then Llama batch-1 decode TP1, TP2, TP2 with
#                   --enable-flashinfer-allreduce-fusion (ranks' tokens checked equal), two GPUs
#   issue6          Llama TP1 and TP2 batch-1 decode, offline DP1 and DP2 (two GPUs)
#   profile_tp2     batch-1 TP2: GPU idle between steps, a kernel trace, cProfile of the worker and the engine
#                   (TP_ARGS: more profile_decode flags, e.g. --enable-flashinfer-allreduce-fusion)
#   single          four one-GPU jobs at once, one per card: Llama offline (DP1), Qwen offline (TP1),
#                   bench_constrained, and the online serving run (100 prompts of random 4096/2048 at 1 req/s)
#   offline_2gpu    Llama offline DP2 on cards 0,1 and Qwen offline TP2 on cards 2,3, at once
#   offline_4gpu    Qwen offline TP4, DP4, then TP2 + DP2
#   constrained     bench_constrained on card 0 (jump-forward on/off, batch-64 mask overhead)
#   shared_prefix   64 groups x 16 prompts (2048-token system prompt, 128 question, 256 out), radix cache on
#                   and off (CACHE="on" for one; SP_ARGS: more bench_offline flags), up to 1024 requests
#                   running, on card 0
#   eager_profile   the shared-prefix run (cache on, 64 output tokens; SP_ARGS: more flags, e.g. an FP8 KV cache)
#                   with the kernels and GPU gaps of 2 of its
#                   eager decode steps (>= 800 rows)
#   cascade_fp8     the FP8 cascade on card 0: check_gpu_path --tune-cascade (launch settings, each level
#                   alone), the kernels of 2 Triton-cascade steps (eager_profile, FP8), shared prefix cache on
#   shared_prefix_ab  the shared-prefix runs cache on, then off, on a fresh card 0 with nothing run before
#                   (so that a kernel compiled in the measured run shows), FP8 KV; check_gpu_path
#                   --cascade-graph-check (cascade decode replayed from a CUDA graph against eager); cache on
#                   again without the cascade CUDA graphs (RADIXSERVE_DISABLE_CASCADE_GRAPHS=1); then the
#                   kernels of 2 decode steps late in the run (own keys ~330)
#   serving         the online run of `single` alone, on card 0
#   radix_cost      no shared prefix: 150 prompts of the offline dataset, radix cache on, then off, on card 0
#   issue4_a        the GPU-path issue's targets at one commit, part 1 (~8 min on an H100): batch-1 decode,
#                   the online run, radix_cost
#   issue4_b        part 2 (~7 min): offline with an FP8 KV cache, the shared-prefix dataset cache on and off
#   batch1_ab       two GPUs (~7 min on a fresh machine): the Triton small-decode check, then batch-1 TP2 (fused
#                   all-reduce) and TP1: default, with FlashInfer's decode (RADIXSERVE_TRITON_DECODE_MAX_BS=0),
#                   with torch's argmax (RADIXSERVE_TORCH_ARGMAX=1), default again; CUDA graphs up to 16 rows
#                   (--cuda-graph-max-bs 16: a shorter capture)
#   issue4_c        part 3 (~4 min): GPU idle between decode steps at batch 64 (profile_decode), then the same
#                   architecture through radixserve's model runner and transformers `generate`, batch 1 and 32
#   offline         Llama offline (the GPU-path issue's random dataset) on card 0
#   offline_steps   the same run with --step-timing: device time by kind of step (decode in CUDA graphs,
#                   decode eager, mixed/prefill), idle between steps, decode steps by rows, on card 0
#   offline_fp8     offline_steps with an FP8 (e4m3) KV cache, on card 0
#   mixed_split     offline_steps with a mixed step's rows all in batch prefill (RADIXSERVE_DISABLE_MIXED_SPLIT=1),
#                   then with its decode rows apart (the default), on card 0
#   decode_profile  decode steps of 128 rows at 2.7k tokens of context (the offline run's typical step): step
#                   period and the kernels of 8 traced steps, on card 0
#   trace_bs1       batch-1 decode on card 0: GPU idle between steps and a kernel trace of 8 steps
#   constrained_gaps  batch-64 decode, every request constrained by a grammar and none: step period and GPU
#                   idle between steps (profile_decode), on card 0
#   attention_check check_gpu_path --only-attention: FlashInfer (plain, extend, cascade) vs the torch
#                   backend, and plain vs cascade decode attention time at 1024 rows sharing 2048 tokens
#   pdl             check_gpu_path --pdl-check (greedy tokens equal with PDL on and off), then batch-1
#                   decode with PDL off (RADIXSERVE_DISABLE_PDL=1) and on, on card 0
#   gemv            bench_gemv: cuBLAS vs the Triton skinny GEMM on the Llama shapes, then
#                   bench_decode_attention: FlashInfer decode plans, on card 0
#   gemv_wide       bench_gemv on the TP1 shapes at 64 and 128 rows only, on card 0
# Offline runs use the GPU-path issue's random dataset: 500 prompts, input U[1,4096], output U[1,2048].
# Models: config.json + tokenizer folders with random weights (--load-format dummy). Results: JSON files
# under $RUNS, with each run's log, packed into $OUT/results.tgz after every run (the device tool returns few
# files).
# JOB_TIMEOUT (seconds, default 1800) bounds each run.
set -uo pipefail

LLAMA=${LLAMA:-.bench-models/llama-3.1-8b}
QWEN=${QWEN:-.bench-models/qwen2-7b}
export OUT=${OUT:-bench_results}
RUNS=${RUNS:-/tmp/runs}
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-$PWD/.fi-cache}
BENCH="python3 -m radixserve.benchmarks"
MODEL="--load-format dummy --context-length 8192"
DATASET="--num-prompts 500 --random-input-len 4096 --random-output-len 2048 --random-range-ratio 0"
mkdir -p "$OUT" "$RUNS"

pack() { tar czf "$OUT/.r$BASHPID.tgz" -C "$RUNS" . && mv "$OUT/.r$BASHPID.tgz" "$OUT/results.tgz"; }
# on GPUS, a named job: its output goes to $OUT/NAME.log and the tail to stdout
job() {
  local gpus=$1 name=$2; shift 2
  echo "--- $name (GPUs $gpus) $(date +%T)"
  CUDA_VISIBLE_DEVICES=$gpus timeout "${JOB_TIMEOUT:-1800}" "$@" --result-dir "$RUNS/$name" \
    > "$RUNS/$name.log" 2>&1
  local rc=$?
  tail -n 14 "$RUNS/$name.log"
  [ $rc -eq 0 ] || echo "!!! $name failed: rc $rc"
  pack
  return $rc
}
latency() { local gpus=$1 name=$2 model=$3; shift 3
  job "$gpus" "$name" $BENCH.bench_latency --model-path "$model" $MODEL --input-len 1024 --output-len 256 \
    --repeats 3 "$@"; }
offline() { local gpus=$1 name=$2 model=$3; shift 3
  job "$gpus" "$name" $BENCH.bench_offline --model-path "$model" $MODEL $DATASET "$@"; }

# the GPU-path issue's shared-prefix dataset (64 groups x 16 prompts, 2048-token system prompt, 128 question)
SHARED_PREFIX="--dataset-name generated-shared-prefix --gsp-num-groups 64 --gsp-prompts-per-group 16
  --gsp-system-prompt-len 2048 --gsp-question-len 128 --max-running-requests 1024"
shared_prefix() { local caches=$1 extra=$2 cache flag  # 256 output tokens, radix cache on and/or off
  for cache in $caches; do
    flag=""; [ "$cache" = off ] && flag=--disable-radix-cache
    job 0 "shared_prefix_$cache" $BENCH.bench_offline --model-path "$LLAMA" $MODEL $SHARED_PREFIX \
      --gsp-output-len 256 $flag $extra
  done; }
eager_profile() { local name=$1; shift  # 64 output tokens, the kernels of 2 decode steps of >= 800 rows
  job 0 "$name" $BENCH.bench_offline --model-path "$LLAMA" $MODEL $SHARED_PREFIX --gsp-output-len 64 \
    --step-timing --profile-decode-steps 2 --profile-min-rows 800 "$@"; }

radix_cost() {  # the cache's cost where nothing is shared (target < 2%)
  offline 0 noshare_cache_on "$LLAMA" --num-prompts 150
  offline 0 noshare_cache_off "$LLAMA" --num-prompts 150 --disable-radix-cache; }

serving() {  # the online target of the GPU-path issue, on one card
  local gpu=$1 port=30011
  CUDA_VISIBLE_DEVICES=$gpu python3 -m radixserve.launch_server --model-path "$LLAMA" $MODEL --port $port \
    > "$RUNS/server.log" 2>&1 &
  local server=$!
  for _ in $(seq 300); do
    python3 -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$port/health').status_code != 200)" \
      2>/dev/null && break
    kill -0 $server 2>/dev/null || { tail -30 "$RUNS/server.log"; return 1; }
    sleep 1
  done
  job "$gpu" serving_rate1 $BENCH.bench_serving --port $port $DATASET --num-prompts 100 --request-rate 1
  kill $server; wait $server
}

for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    allreduce)
      job 0,1 allreduce_w2 $BENCH.bench_all_reduce --world-size 2
      [ "$(nvidia-smi -L | wc -l)" -ge 4 ] && \
        job 0,1,2,3 allreduce_w4 $BENCH.bench_all_reduce --world-size 4 ;;
    latency_llama)
      latency 0 llama_tp1 "$LLAMA"
      latency 0,1 llama_tp2 "$LLAMA" --tp-size 2
      latency 0,1 llama_tp2_nccl "$LLAMA" --tp-size 2 --disable-custom-all-reduce
      latency 0,1,2,3 llama_tp4 "$LLAMA" --tp-size 4 ;;
    latency_tp1)
      latency 0 llama_tp1 "$LLAMA" ;;
    tp2_fused)
      # all-reduce + add + RMSNorm fused (FlashInfer): the kernel against the unfused pair, then batch-1 decode
      job 0,1 allreduce_fused $BENCH.bench_all_reduce --world-size 2 --fused-norm --sizes-kib 8 2048
      latency 0 llama_tp1 "$LLAMA"
      latency 0,1 llama_tp2 "$LLAMA" --tp-size 2
      latency 0,1 llama_tp2_fused "$LLAMA" --tp-size 2 --enable-flashinfer-allreduce-fusion
      # the ranks' tokens compared after every step (an all-gather and a host sync a step: not timed)
      RADIXSERVE_CHECK_TP_TOKENS=1 latency 0,1 llama_tp2_fused_check "$LLAMA" --tp-size 2 \
        --enable-flashinfer-allreduce-fusion --repeats 1 ;;
    latency_qwen)
      latency 0 qwen_tp1 "$QWEN"
      latency 0,1 qwen_tp2 "$QWEN" --tp-size 2
      latency 0,1,2,3 qwen_tp4 "$QWEN" --tp-size 4 ;;
    issue6)
      # the two-GPU acceptance runs: batch-1 TP2 vs TP1 and offline DP2 vs DP1 (Llama-3.1-8B)
      latency 0 llama_tp1 "$LLAMA" &
      offline 1 llama_dp1 "$LLAMA" &
      wait
      offline 0,1 llama_dp2 "$LLAMA" --dp-size 2
      latency 0,1 llama_tp2 "$LLAMA" --tp-size 2 ;;
    profile_tp2)
      # where a batch-1 TP2 step goes: GPU idle between steps + a kernel trace, and host profiles of both
      # sides
      RADIXSERVE_WORKER_PROFILE=$RUNS/worker.prof job 0,1 profile_tp2 $BENCH.profile_decode \
        --model-path "$LLAMA" $MODEL --tp-size 2 --batch-size 1 --input-len 1024 --output-len 200 \
        --skip-steps 20 --torch-profile-steps 12 ${TP_ARGS:-}
      latency 0,1 llama_tp2_cprofile "$LLAMA" --tp-size 2 --repeats 1 --cprofile "$RUNS/main_tp2.prof" ;;
    constrained)
      job 0 constrained $BENCH.bench_constrained --model-path "$LLAMA" $MODEL ;;
    shared_prefix)
      shared_prefix "${CACHE:-on off}" "${SP_ARGS:-}" ;;
    eager_profile)  # the kernels of 2 eager decode steps of the shared-prefix run (>= 800 rows, cascade)
      eager_profile eager_profile ${SP_ARGS:-} ;;
    cascade_fp8)
      CUDA_VISIBLE_DEVICES=0 timeout "${JOB_TIMEOUT:-1800}" python3 -m radixserve.benchmarks.check_gpu_path \
        --tune-cascade --out "$RUNS/tune_cascade.json" > "$RUNS/tune_cascade.log" 2>&1
      echo "tune_cascade rc $?"; grep "^{'block" "$RUNS/tune_cascade.log"; pack
      eager_profile eager_profile_fp8 --kv-cache-dtype fp8_e4m3
      shared_prefix on "--kv-cache-dtype fp8_e4m3 --step-timing" ;;
    shared_prefix_ab)
      shared_prefix "on off" "--kv-cache-dtype fp8_e4m3 --step-timing"
      CUDA_VISIBLE_DEVICES=0 timeout "${JOB_TIMEOUT:-1800}" python3 -m radixserve.benchmarks.check_gpu_path \
        --cascade-graph-check --out "$RUNS/cascade_graph_check.json" > "$RUNS/cascade_graph_check.log" 2>&1
      echo "cascade_graph_check rc $?"; tail -n 2 "$RUNS/cascade_graph_check.log"; pack
      RADIXSERVE_DISABLE_CASCADE_GRAPHS=1 job 0 shared_prefix_on_eager $BENCH.bench_offline \
        --model-path "$LLAMA" $MODEL $SHARED_PREFIX --gsp-output-len 256 --kv-cache-dtype fp8_e4m3 --step-timing
      job 0 shared_prefix_late_profile $BENCH.bench_offline --model-path "$LLAMA" $MODEL $SHARED_PREFIX \
        --gsp-output-len 256 --kv-cache-dtype fp8_e4m3 --step-timing --profile-decode-steps 2 \
        --profile-min-rows 800 --profile-skip-steps 200 ;;
    serving)
      serving 0 ;;
    radix_cost)
      radix_cost ;;
    issue4_a)
      latency 0 llama_tp1 "$LLAMA"
      serving 0
      radix_cost ;;
    issue4_b)
      offline 0 llama_offline_fp8 "$LLAMA" --step-timing --kv-cache-dtype fp8_e4m3
      shared_prefix "on off" "--kv-cache-dtype fp8_e4m3 --step-timing" ;;
    batch1_ab)
      CUDA_VISIBLE_DEVICES=0 timeout "${JOB_TIMEOUT:-1800}" python3 -m radixserve.benchmarks.check_gpu_path \
        --triton-decode-check --skip-mixed --out "$RUNS/triton_decode_check.json" \
        > "$RUNS/triton_decode_check.log" 2>&1
      echo "triton_decode_check rc $?"; tail -n 3 "$RUNS/triton_decode_check.log"; pack
      for tp in 2 1; do
        gpus=0; flags="--cuda-graph-max-bs 16"
        [ $tp = 2 ] && gpus=0,1 && flags="$flags --tp-size 2 --enable-flashinfer-allreduce-fusion"
        latency $gpus llama_tp${tp} "$LLAMA" $flags
        RADIXSERVE_TORCH_ARGMAX=1 latency $gpus llama_tp${tp}_torch_argmax "$LLAMA" $flags
        RADIXSERVE_TRITON_DECODE_MAX_BS=0 latency $gpus llama_tp${tp}_flashinfer_decode "$LLAMA" $flags
        latency $gpus llama_tp${tp}_again "$LLAMA" $flags
      done ;;
    issue4_c)
      job 0 idle_bs64 $BENCH.profile_decode --model-path "$LLAMA" $MODEL --batch-size 64 --input-len 1024 \
        --output-len 256
      job 0 one_batch_1_32 $BENCH.bench_one_batch --model-path "$LLAMA" --load-format dummy \
        --batch-size 1 32 --input-len 1024 --output-len 64
      job 0 hf_generate_1_32 $BENCH.bench_hf_generate --model-path "$LLAMA" --dummy --batch-size 1 32 \
        --input-len 1024 --output-len 64 ;;
    offline)
      offline 0 llama_offline "$LLAMA" ;;
    offline_steps)
      offline 0 llama_offline_steps "$LLAMA" --step-timing ;;
    offline_fp8)
      offline 0 llama_offline_fp8 "$LLAMA" --step-timing --kv-cache-dtype fp8_e4m3 ;;
    mixed_split)
      RADIXSERVE_DISABLE_MIXED_SPLIT=1 offline 0 llama_offline_nosplit "$LLAMA" --step-timing
      offline 0 llama_offline_split "$LLAMA" --step-timing ;;
    decode_profile)  # the offline run's typical decode step: 128 rows at ~2.7k tokens of context
      job 0 decode_profile_128 $BENCH.profile_decode --model-path "$LLAMA" $MODEL --batch-size 128 \
        --input-len 2700 --output-len 400 --skip-steps 16 --torch-profile-steps 8 ;;
    trace_bs1)
      job 0 trace_bs1 $BENCH.profile_decode --model-path "$LLAMA" $MODEL --batch-size 1 --input-len 1024 \
        --output-len 120 --skip-steps 20 --torch-profile-steps 8 ;;
    single)
      offline 0 llama_dp1 "$LLAMA" &
      offline 1 qwen_tp1_offline "$QWEN" &
      job 2 constrained $BENCH.bench_constrained --model-path "$LLAMA" $MODEL &
      serving 3 &
      wait ;;
    offline_2gpu)
      offline 0,1 llama_dp2 "$LLAMA" --dp-size 2 &
      offline 2,3 qwen_tp2_offline "$QWEN" --tp-size 2 &
      wait ;;
    offline_4gpu)
      offline 0,1,2,3 qwen_tp4_offline "$QWEN" --tp-size 4
      offline 0,1,2,3 qwen_dp4_offline "$QWEN" --dp-size 4
      offline 0,1,2,3 qwen_tp2dp2_offline "$QWEN" --tp-size 2 --dp-size 2 ;;
    constrained_gaps)
      for grammar in "" "root ::= [a-z ] root"; do
        job 0 "constrained_gaps${grammar:+_ebnf}" $BENCH.profile_decode --model-path "$LLAMA" $MODEL \
          --batch-size 64 --input-len 1024 --output-len 200 --skip-steps 20 ${grammar:+--ebnf "$grammar"}
      done ;;
    attention_check)
      CUDA_VISIBLE_DEVICES=0 python3 -m radixserve.benchmarks.check_gpu_path --only-attention \
        --out "$RUNS/attention_check.json" 2>&1 | tail -n 30; pack ;;
    pdl)
      CUDA_VISIBLE_DEVICES=0 python3 -m radixserve.benchmarks.check_gpu_path --model "$LLAMA" --pdl-check \
        --out "$RUNS/pdl_check.json" > "$RUNS/pdl_check.log" 2>&1; echo "pdl check rc $?"
      tail -n 12 "$RUNS/pdl_check.log"; pack
      RADIXSERVE_DISABLE_PDL=1 latency 0 llama_tp1_nopdl "$LLAMA"
      latency 0 llama_tp1_pdl "$LLAMA" ;;
    gemv)
      job 0 gemv_linear $BENCH.bench_gemv
      job 0 gemv_attention $BENCH.bench_decode_attention ;;
    gemv_wide)  # the TP1 shapes at the offline run's decode batches
      job 0 gemv_wide $BENCH.bench_gemv --tp 1 --batches 64 128 ;;
    *)
      echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
pack
