#!/usr/bin/env bash
# Runs an admm_jax config on the GPUs of this machine: one process that drives every GPU
# (the default), or N processes with a localhost coordinator. --dry-run prints the commands.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local_gpus.sh --config=CONFIG [options] [-- OVERRIDES...]

One machine, several GPUs. By default one process sees all (or --gpus) GPUs and the "data"
mesh axis spans them: nothing else is needed. With --processes=N the GPUs are split evenly
over N processes that join through jax.distributed at 127.0.0.1:PORT (one process per GPU
is what multi-node GPU clusters do; on one machine it mostly helps to rehearse them).
Process 0 prints to the terminal; the others write WORKDIR/process<i>.log.

Options:
  --config=FILE[:ARG]   config file (required), e.g. configs/fashion_mnist_lenet.py
  --workdir=DIR         run directory (default runs/local_gpus)
  --gpus=LIST           GPU ids to use, e.g. 0,1,2,3 (default: all that nvidia-smi lists;
                        required with --processes>1 when nvidia-smi is missing)
  --processes=N         processes on this machine (default 1); must divide the GPU count
  --port=PORT           coordinator port on 127.0.0.1 (default 12355)
  --cpu-devices=N       no GPUs: run on N forced host CPU devices per process (to rehearse)
  --python=PYTHON       interpreter with admm_jax installed (default: python3)
  --dry-run             print the exact commands and run nothing
  -h, --help            this text
Everything after `--` goes to admm_jax.main unchanged, e.g. -- --config.batch_size=256

Examples:
  launch/local_gpus.sh --config=configs/fashion_mnist_lenet.py --gpus=0,1,2,3
  launch/local_gpus.sh --config=configs/fashion_mnist_lenet.py --gpus=0,1,2,3 --processes=2
EOF
}

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # die, quote, show

CONFIG="" WORKDIR="runs/local_gpus" GPUS="" PROCESSES=1 PORT=12355 CPU_DEVICES=0
PYTHON=python3 DRY_RUN=0 OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --config=*) CONFIG=${1#*=} ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --gpus=*) GPUS=${1#*=} ;;
    --processes=*) PROCESSES=${1#*=} ;;
    --port=*) PORT=${1#*=} ;;
    --cpu-devices=*) CPU_DEVICES=${1#*=} ;;
    --python=*) PYTHON=${1#*=} ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) die "unknown argument '$1' (flags are --name=VALUE style; config overrides go after --): see --help." ;;
  esac
  shift
done

[[ -n $CONFIG ]] || die "--config is required (e.g. configs/fashion_mnist_lenet.py): see --help."
[[ -f ${CONFIG%%:*} ]] || die "--config='$CONFIG': ${CONFIG%%:*} is not a file (paths are relative to $(pwd))."
[[ $PROCESSES =~ ^[1-9][0-9]*$ ]] || die "--processes='$PROCESSES' must be a positive integer."
[[ $PORT =~ ^[0-9]+$ ]] && (( PORT >= 1 && PORT <= 65535 )) \
  || die "--port='$PORT' must be a port number in 1..65535."
[[ $CPU_DEVICES =~ ^[0-9]+$ ]] || die "--cpu-devices='$CPU_DEVICES' must be a non-negative integer."
for o in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  [[ $o == --config.* ]] || die "override '$o' after -- is not a --config.FIELD=VALUE flag."
done

IDS=()
if [[ $CPU_DEVICES -gt 0 ]]; then
  [[ -z $GPUS ]] || die "--gpus and --cpu-devices exclude each other: pick GPUs or forced CPU devices."
elif [[ -n $GPUS ]]; then
  [[ $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus='$GPUS' is not a comma-separated list of GPU ids (e.g. 0,1,2,3)."
  IFS=, read -r -a IDS <<< "$GPUS"
elif [[ $PROCESSES -gt 1 ]]; then
  command -v nvidia-smi > /dev/null \
    || die "nvidia-smi is not available to count the GPUs: pass --gpus=0,1,... (or --cpu-devices=N to rehearse on CPU)."
  mapfile -t IDS < <(nvidia-smi --query-gpu=index --format=csv,noheader)
  [[ ${#IDS[@]} -gt 0 ]] || die "nvidia-smi lists no GPUs: pass --gpus or --cpu-devices."
fi
if [[ ${#IDS[@]} -gt 0 ]] && (( ${#IDS[@]} % PROCESSES )); then
  die "--processes=$PROCESSES does not divide the ${#IDS[@]} GPUs (${IDS[*]}): every process needs the same number of GPUs."
fi

# The environment and the command line of process $1.
process_cmd() {
  local i=$1 env=() per cmd
  if [[ $CPU_DEVICES -gt 0 ]]; then
    env+=(JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$CPU_DEVICES")
  elif [[ ${#IDS[@]} -gt 0 ]]; then
    per=$(( ${#IDS[@]} / PROCESSES ))
    local mine=("${IDS[@]:$(( i * per )):$per}")
    env+=("CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${mine[*]}")")
  fi
  cmd=("$PYTHON" -m admm_jax.main --config="$CONFIG" --workdir="$WORKDIR")
  if [[ $PROCESSES -gt 1 ]]; then
    cmd+=(--config.parallel.distributed=True --config.parallel.coordinator_address="127.0.0.1:$PORT"
          --config.parallel.num_processes="$PROCESSES" --config.parallel.process_id="$i")
  fi
  cmd+=(${OVERRIDES[@]+"${OVERRIDES[@]}"})
  if [[ ${#env[@]} -gt 0 ]]; then CMD=(env "${env[@]}" "${cmd[@]}"); else CMD=("${cmd[@]}"); fi
}

if [[ $DRY_RUN == 1 ]]; then
  if [[ $PROCESSES -gt 1 ]]; then show mkdir -p "$WORKDIR"; fi
  for (( i = 0; i < PROCESSES; i++ )); do
    process_cmd "$i"
    if [[ $PROCESSES -gt 1 && $i -gt 0 ]]; then
      echo "$(show "${CMD[@]}") > $(quote "$WORKDIR/process$i.log") 2>&1 &"
    elif [[ $PROCESSES -gt 1 ]]; then
      echo "$(show "${CMD[@]}") &"
    else
      show "${CMD[@]}"
    fi
  done
  if [[ $PROCESSES -gt 1 ]]; then echo "wait"; fi
  exit 0
fi

if [[ $PROCESSES == 1 ]]; then
  process_cmd 0
  show "${CMD[@]}"
  exec "${CMD[@]}"
fi

mkdir -p "$WORKDIR"
PIDS=()
# TERM first, KILL after 10 s: a process blocked in a collective, or one whose
# jax.distributed client handles SIGTERM (preemption notices), may not stop on TERM.
cleanup() {
  local pid n
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2> /dev/null || true; done
  for (( n = 0; n < 20; n++ )); do
    for pid in "${PIDS[@]}"; do
      if kill -0 "$pid" 2> /dev/null; then sleep 0.5; continue 2; fi
    done
    return 0
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2> /dev/null || true; done
}
trap 'cleanup; exit 130' INT TERM
for (( i = 0; i < PROCESSES; i++ )); do
  process_cmd "$i"
  show "${CMD[@]}"
  if [[ $i == 0 ]]; then
    "${CMD[@]}" &
  else
    "${CMD[@]}" > "$WORKDIR/process$i.log" 2>&1 &
  fi
  PIDS+=($!)
done
# The first process to fail stops the others: the survivors would wait on it for minutes.
# (Polling with kill -0: bash reaps finished children itself and `wait PID` then returns
# the saved status; `wait -n` differs between bash versions.)
status=0
remaining=("${PIDS[@]}")
while [[ ${#remaining[@]} -gt 0 ]]; do
  still=()
  for pid in "${remaining[@]}"; do
    if kill -0 "$pid" 2> /dev/null; then still+=("$pid"); elif ! wait "$pid"; then status=1; fi
  done
  if [[ $status != 0 ]]; then
    echo "error: a process failed; stopping the others (logs: $WORKDIR/process*.log)" >&2
    cleanup
    wait || true
    break
  fi
  remaining=(${still[@]+"${still[@]}"})
  if [[ ${#remaining[@]} -gt 0 ]]; then sleep 1; fi
done
exit $status
