#!/usr/bin/env bash
# The accelerator table (issue 27): admm_jax's adversarial ADMM train step against the same
# step in torch eager and under torch.compile, LeNet(4), VGG-16(16) and ResNet-18(16), PGD-10,
# batch 128 and 512, float32 and bfloat16, with compile seconds and % of the matmul peak.
#
#   bash benchmarks/gpu_bench.sh [OUT_DIR]        (default runs/gpu_bench; from the repo root)
#
# One process per row, each under `timeout $CASE_TIMEOUT` (default 300 s), its JSON in
# OUT_DIR/<case>.json; rows already there are skipped, so running the same command again
# finishes what a time limit cut off (jax's programs come from OUT_DIR/jax_cache then: such a
# row's compile seconds say "(cached)"). Prints the markdown table at the end.
# Environment: CASES (space-separated model:width:steps:batch:dtype), TORCH_COMPILE (a
# torch.compile backend, default inductor; "none" skips it), BENCH_ARGS (more bench.py flags),
# CASE_TIMEOUT, PYTHON (the interpreter with jax[cuda] and a CUDA torch; default python).
set -u
OUT=${1:-runs/gpu_bench}
CASES=${CASES:-"lenet:4:10:128:f32 lenet:4:10:128:bf16 vgg16:16:10:128:f32 vgg16:16:10:128:bf16
resnet18:16:10:128:f32 resnet18:16:10:128:bf16 lenet:4:10:512:f32 lenet:4:10:512:bf16
vgg16:16:10:512:f32 vgg16:16:10:512:bf16 resnet18:16:10:512:f32 resnet18:16:10:512:bf16"}
TORCH_COMPILE=${TORCH_COMPILE:-inductor}
BENCH_ARGS=${BENCH_ARGS:-"--repeats 3 --min-seconds 0.5"}
CASE_TIMEOUT=${CASE_TIMEOUT:-300}
PYTHON=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
compile_flag=(--torch-compile "$TORCH_COMPILE")
[ "$TORCH_COMPILE" = none ] && compile_flag=()
for case in $CASES; do
  json="$OUT/${case//:/_}.json"
  if [ -s "$json" ]; then echo "$case: done earlier ($json)" >&2; continue; fi
  echo "$case: running" >&2
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
  if timeout "$CASE_TIMEOUT" "$PYTHON" "$HERE/bench.py" --cases "$case" --json --no-extras \
      --cache "$OUT/jax_cache" "${compile_flag[@]}" $BENCH_ARGS > "$json.part"; then
    mv "$json.part" "$json"
  else
    echo "$case: failed or timed out (exit $?); run the same command again to retry it" >&2
  fi
done
rows=("$OUT"/*.json)
[ -e "${rows[0]}" ] && "$PYTHON" "$HERE/bench.py" --table "${rows[@]}"
