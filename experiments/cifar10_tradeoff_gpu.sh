#!/usr/bin/env bash
# The longer-schedule ResNet-20 / CIFAR-10 runs of cifar10_tradeoff.py, side by side on one GPU.
#
#   ARCHIVE=path/to/cifar10-jpeg.tar.gz COUPLE=8 REFINE=8 DEADLINE=520 OUTDIR=/tmp/gpu \
#       bash experiments/cifar10_tradeoff_gpu.sh
#
# Five processes share the machine (ResNet-20 at batch 128 leaves a large GPU mostly idle):
# soft quantization with a bit budget of 2 bits (alpha 0.66 and 0.9) and of 1 bit (w 0.9 and
# 1.5), each followed by its HEQ + tied-refinement control at the same K_l, and the
# full-precision model trained on for the same epochs. Each process writes its own results
# file under OUTDIR (the controls read their source row from it); every process is stopped
# DEADLINE seconds after this script starts (decoding the archive counts: leave the caller's
# own limit some 30 s beyond it for the gathering), and whatever rows finished are gathered
# into OUTDIR/rows.jsonl, the logs into OUTDIR/logs.txt. Merge the rows into
# experiments/results/cifar10_tradeoff.jsonl, then rebuild the table with
# `python experiments/cifar10_tradeoff.py --pretrained ... --report-only`.
# LIMIT (limit_train_batches) makes a smoke run of the same script on a CPU.
#
# JOBFILE replaces the five built-in jobs: one job a line, a name then its flags, e.g.
#   s2b0 --alpha 0.9 --points 5e-3:0.9 --max-bits 2 --edge-bits 4 --reassign --seed 0
# Each job keeps its resume checkpoint under OUTDIR/<job>/runs; a run stopped at DEADLINE is
# left there (and packed into OUTDIR/unfinished.tgz), so it can be continued elsewhere with
# `--resume-dir <that runs folder>` and the same flags (a run that finished its epochs but not
# its row, e.g. for want of `constriction`, then only evaluates). cifar10_tradeoff.py checks
# for `constriction` before training. On an H200 (2026-12-04) an epoch took 10-14 s with three
# runs sharing the GPU and 15-16 s with four (THREADS 3-4 each): plan a call's jobs by that.
set -u
PY=${PY:-python3}
COUPLE=${COUPLE:-8}
REFINE=${REFINE:-8}
LIMIT=${LIMIT:-1}
DEADLINE=${DEADLINE:-520}
OUTDIR=${OUTDIR:-/tmp/cifar10_gpu}
THREADS=${THREADS:-3}
JOBS=${JOBS:-"j1 j2 j3 j4 j5"}
ARCHIVE_ARG=${ARCHIVE:+--archive $ARCHIVE}
here=$(cd "$(dirname "$0")" && pwd)
started=$SECONDS
mkdir -p "$OUTDIR"

# Decode the archive once into the cache that every process then reads.
OMP_NUM_THREADS=$THREADS $PY -c "
import sys
from sq_lightning.data import CIFAR10DataModule
CIFAR10DataModule(archive=sys.argv[1] or None).setup('fit')
" "${ARCHIVE:-}" || exit 1

base=("$here/cifar10_tradeoff.py" --pretrained "$here/checkpoints/resnet20_cifar10_fp.ckpt" --schedule cosine
      --couple-epochs "$COUPLE" --refine-epochs "$REFINE" --limit "$LIMIT" $ARCHIVE_ARG)
ramp=(--ramp-steps $((COUPLE * 391)))  # the h ramp spans the coupling epochs (391 batches of 128 an epoch)
declare -A spec=(
  [j1]="--points 1e-3:0.9 --max-bits 2 --controls heq:1e-3:0.9"
  [j2]="--alpha 0.9 --points 5e-3:0.9 --max-bits 2 --controls heq:5e-3:0.9"
  [j3]="--points 1e-3:0.9 --max-bits 1 --controls heq:1e-3:0.9"
  [j4]="--points 1e-3:1.5 --max-bits 1 --controls heq:1e-3:1.5"
  [j5]="--fp-control"
)
if [ -n "${JOBFILE:-}" ]; then
  spec=()
  JOBS=""
  while read -r name flags; do
    [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
    spec[$name]=$flags
    JOBS="$JOBS $name"
  done < "$JOBFILE"
fi
left_s=$((DEADLINE - (SECONDS - started)))
[ "$left_s" -gt 0 ] || { echo "DEADLINE $DEADLINE s passed while decoding the archive" >&2; exit 1; }
for j in $JOBS; do
  mkdir -p "$OUTDIR/$j"
  # shellcheck disable=SC2086  # the job's flags are meant to split
  OMP_NUM_THREADS=$THREADS PYTHONUNBUFFERED=1 timeout "$left_s" $PY "${base[@]}" "${ramp[@]}" ${spec[$j]} \
    --out "$OUTDIR/$j/rows.jsonl" --resume-dir "$OUTDIR/$j/runs" > "$OUTDIR/$j/log.txt" 2>&1 &
done
wait
cat "$OUTDIR"/*/rows.jsonl > "$OUTDIR/rows.jsonl" 2>/dev/null
left=$(cd "$OUTDIR" && ls -d ./*/runs/*/last.ckpt 2>/dev/null | xargs -r -n1 dirname)
# shellcheck disable=SC2086  # one folder a word
[ -n "$left" ] && tar czf "$OUTDIR/unfinished.tgz" -C "$OUTDIR" $left
for j in $JOBS; do
  echo "=== $j: ${spec[$j]}"
  grep -v "is not clustered\|LeafSpec\|_pytree" "$OUTDIR/$j/log.txt"
done > "$OUTDIR/logs.txt"
echo "rows finished: $(wc -l < "$OUTDIR/rows.jsonl")"
