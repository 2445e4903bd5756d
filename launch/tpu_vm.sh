#!/usr/bin/env bash
# Runs an admm_jax config on a Cloud TPU VM (or pod slice) from a workstation:
# create the VM, install admm_jax on every worker, run the config on all workers, fetch
# report.json (and metrics.jsonl) from worker 0, delete the VM. --dry-run prints the commands.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh --name=NAME --zone=ZONE --config=CONFIG [options] [-- OVERRIDES...]

Creates a Cloud TPU VM (or pod slice), installs admm_jax from this checkout on every
worker, runs `python -m admm_jax.main --config=CONFIG --config.parallel.distributed=True`
on all workers at once, copies report.json and metrics.jsonl from worker 0, and deletes the
VM (also when install, run or fetch failed, unless --keep; never after a failed create,
since the name may belong to a VM that existed before).

Required:
  --name=NAME               TPU VM name (lowercase letters, digits, hyphens)
  --zone=ZONE               e.g. us-central2-b (v4), us-west4-a (v5e)
  --config=FILE[:ARG]       config file inside this repository, e.g.
                            configs/fashion_mnist_lenet.py or configs/fashion_mnist_lenet.py:tiny
Options:
  --accelerator-type=TYPE   TPU type and size (default v4-8; a pod slice: v4-32, v5litepod-16)
  --version=RUNTIME         TPU VM software version (default tpu-ubuntu2204-base)
  --project=PROJECT         Google Cloud project (default: gcloud's configured project)
  --spot                    create a Spot TPU VM (cheaper, may be preempted)
  --workdir=DIR             run directory on the workers (default runs/NAME, relative to the
                            checkout on each worker); on a multi-host slice give a directory
                            that all workers share (e.g. a gcsfuse or Filestore mount)
  --out=DIR                 where the fetched files go here (default tpu_runs/NAME)
  --steps=LIST              comma-separated subset of create,install,run,fetch,delete, run in
                            that order (default: all five)
  --keep                    never delete the VM (for debugging; remember to delete it)
  --skip-data               do not apt-get install Debian's dataset-fashion-mnist on the workers
  --dry-run                 print the exact commands and run nothing
  -h, --help                this text
Everything after `--` goes to admm_jax.main unchanged, e.g. -- --config.batch_size=512

Example:
  launch/tpu_vm.sh --name=admm-v4 --zone=us-central2-b --accelerator-type=v4-8 \
      --config=configs/fashion_mnist_lenet.py -- --config.model.width=8
EOF
}

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # die, quote, show

# Prints a command, quoted; runs it unless --dry-run.
run() {
  show "$@"
  if [[ $DRY_RUN == 0 ]]; then "$@"; fi
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAME="" ZONE="" CONFIG="" ACCEL="v4-8" VERSION="tpu-ubuntu2204-base" PROJECT="" SPOT=0
WORKDIR="" OUT="" STEPS="create,install,run,fetch,delete" KEEP=0 SKIP_DATA=0 DRY_RUN=0
OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --name=*) NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --config=*) CONFIG=${1#*=} ;;
    --accelerator-type=*) ACCEL=${1#*=} ;;
    --version=*) VERSION=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --spot) SPOT=1 ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --out=*) OUT=${1#*=} ;;
    --steps=*) STEPS=${1#*=} ;;
    --keep) KEEP=1 ;;
    --skip-data) SKIP_DATA=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) die "unknown argument '$1' (flags are --name=VALUE style; config overrides go after --): see --help." ;;
  esac
  shift
done

[[ -n $NAME ]] || die "--name is required (the TPU VM's name): see --help."
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
  || die "--name='$NAME' is not a valid TPU name: use lowercase letters, digits and hyphens, starting with a letter."
[[ -n $ZONE ]] || die "--zone is required (e.g. us-central2-b): see --help."
[[ $ACCEL =~ ^[a-z0-9]+-[0-9]+$ ]] \
  || die "--accelerator-type='$ACCEL' is not TYPE-SIZE (e.g. v4-8, v4-32, v5litepod-16)."
[[ -n $VERSION ]] || die "--version must not be empty (e.g. tpu-ubuntu2204-base)."
ALL_STEPS=(create install run fetch delete)
IFS=, read -r -a WANTED <<< "$STEPS"
[[ ${#WANTED[@]} -gt 0 ]] || die "--steps is empty: name some of create,install,run,fetch,delete."
for s in "${WANTED[@]}"; do
  [[ " ${ALL_STEPS[*]} " == *" $s "* ]] \
    || die "--steps: unknown step '$s'; use a comma-separated subset of create,install,run,fetch,delete."
done
wants() { [[ ",$STEPS," == *",$1,"* ]]; }
if wants run; then
  [[ -n $CONFIG ]] || die "--config is required for the run step (e.g. configs/fashion_mnist_lenet.py)."
  [[ -f $REPO/${CONFIG%%:*} ]] \
    || die "--config='$CONFIG': ${CONFIG%%:*} is not a file in $REPO (give a path relative to the repository: the workers get its configs/)."
fi
for o in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  [[ $o == --config.* ]] || die "override '$o' after -- is not a --config.FIELD=VALUE flag."
done
if [[ ${ACCEL##*-} -gt 8 && ${WORKDIR:0:1} != / ]]; then
  # Sizes above 8 are multi-host slices (v2, v3, v4, v5e, v5p, v6e alike).
  echo "warning: $ACCEL has several workers: give --workdir=/a/directory/all/workers/share" \
       "(a gcsfuse or Filestore mount); orbax checkpoints and the stages' outputs are read" \
       "back by every worker." >&2
fi
WORKDIR=${WORKDIR:-runs/$NAME}
OUT=${OUT:-tpu_runs/$NAME}

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
if [[ -n $PROJECT ]]; then WHERE+=(--project="$PROJECT"); fi
TARBALL=${TMPDIR:-/tmp}/admm_jax-$NAME.tar.gz
# On each worker, in the login user's home (where gcloud's ssh commands start).
SRC=admm_jax_src
VENV=admm_jax_venv
# The run's --workdir is relative to the checkout on the workers (unless absolute).
case $WORKDIR in /*) REMOTE_WORKDIR=$WORKDIR ;; *) REMOTE_WORKDIR=$SRC/$WORKDIR ;; esac

step_create() {
  local cmd=("${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCEL" --version="$VERSION")
  if [[ $SPOT == 1 ]]; then cmd+=(--spot); fi
  run "${cmd[@]}"
}

step_install() {
  # This checkout (not a release) goes to every worker, so what runs is what you see here.
  local files=(pyproject.toml admm_jax configs launch)
  if [[ -f $REPO/README.md ]]; then files+=(README.md); fi
  run tar -czf "$TARBALL" --exclude=__pycache__ -C "$REPO" "${files[@]}" || return
  run "${GCLOUD[@]}" scp "$TARBALL" "$NAME:admm_jax.tar.gz" "${WHERE[@]}" --worker=all || return
  local remote="set -e; rm -rf $SRC; mkdir -p $SRC; tar -xzf admm_jax.tar.gz -C $SRC"
  if [[ $SKIP_DATA == 0 ]]; then
    remote+="; sudo apt-get update -q; sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist"
  fi
  remote+="; python3 -m venv $VENV || { sudo apt-get install -y -q python3-venv; python3 -m venv $VENV; }"
  remote+="; $VENV/bin/pip install -q --upgrade pip; $VENV/bin/pip install -q \"./$SRC[tpu]\""
  remote+="; $VENV/bin/python -c \"import jax; print(jax.devices())\""
  run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$remote"
}

step_run() {
  # From the checkout, so that the config path resolves the same on every worker.
  local main="../$VENV/bin/python -m admm_jax.main --config=$(quote "$CONFIG")"
  main+=" --config.parallel.distributed=True --workdir=$(quote "$WORKDIR")"
  local o
  for o in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do main+=" $(quote "$o")"; done
  run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="set -e; cd $SRC; $main"
}

step_fetch() {
  # Only process 0 (on worker 0) writes report.json and metrics.jsonl.
  run mkdir -p "$OUT" || return
  run "${GCLOUD[@]}" scp "$NAME:$REMOTE_WORKDIR/report.json" "$NAME:$REMOTE_WORKDIR/metrics.jsonl" \
    "$OUT/" "${WHERE[@]}" --worker=0
}

step_delete() {
  run "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet
}

if [[ $DRY_RUN == 0 ]] && ! command -v gcloud > /dev/null; then
  die "gcloud is not installed (https://cloud.google.com/sdk/docs/install); --dry-run prints the commands without it."
fi

failed=""
for s in create install run fetch; do
  if ! wants "$s"; then continue; fi
  echo "# $s"
  if ! "step_$s"; then failed=$s; break; fi
done
if [[ $failed == create ]]; then
  # Not ours to delete: the name may belong to a VM that existed before.
  echo "# create failed: nothing deleted" >&2
elif wants delete && [[ $KEEP == 0 ]]; then
  if [[ -n $failed ]]; then
    echo "# $failed failed: deleting $NAME anyway (pass --keep to keep it for debugging)" >&2
  fi
  echo "# delete"
  step_delete
elif [[ $DRY_RUN == 0 ]]; then
  echo "# $NAME is left running (and billing); delete it with:" \
       "launch/tpu_vm.sh --name=$NAME --zone=$ZONE --steps=delete" >&2
fi
if [[ -n $failed ]]; then die "step '$failed' failed (see its output above)."; fi
if [[ $DRY_RUN == 0 ]] && wants fetch; then echo "# report: $OUT/report.json"; fi
exit 0
