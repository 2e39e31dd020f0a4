#!/bin/bash
# The testbed ablation's runs, in the order its plan gives (docs/results.md), on a 2-core machine: two
# runs side by side (each quality command trains --jobs 2 of its runs at a time), from a frozen copy
# of this checkout (Ray workers import the code as it is when each stage starts), with every finished
# and interrupted stage exported into this folder every 10 minutes, so that a replaced machine loses
# at most those minutes.
#
#   docs/ablation-runs/chain.sh EXP    # EXP: a folder outside the checkout; made (tree/, runs/, data/, docs/)
#   DRY_RUN=1 docs/ablation-runs/chain.sh EXP    # each command's runs: cached, to resume, or to train
#
# Idempotent: run it again, on this machine or a new one, and it goes on from the stage cache and the
# export. Stop it with:  pkill -TERM -f ablation-runs/chain.sh; pkill -TERM -f "pipeline quality"
# (each quality command stops its runs after SIGTERM; they resume from their last epoch), then export
# once more:  S4MIM_RUNS=EXP/runs s4mim runs export docs/ablation-runs
set -u
EXP=$(realpath -m "${1:?usage: docs/ablation-runs/chain.sh EXP}")
REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
S4MIM=$REPO/.venv/bin/s4mim
EXPORT=$REPO/docs/ablation-runs
mkdir -p "$EXP/runs" "$EXP/data" "$EXP/docs"
if [ ! -d "$EXP/tree" ]; then
  mkdir -p "$EXP/tree" && git -C "$REPO" archive HEAD | tar -x -C "$EXP/tree"
fi
S4MIM_RUNS=$EXP/runs "$S4MIM" runs import "$EXPORT"
# the data once, before two commands would each start generating it
[ -f "$EXP/data/shapes/shapes.json" ] || "$S4MIM" data synth --seed 0 --root "$EXP/data/shapes"

q() {  # one quality table from the frozen tree, one thread per run
  (cd "$EXP/tree" && PYTHONPATH=$EXP/tree S4MIM_RUNS=$EXP/runs S4MIM_DATA=$EXP/data \
     "$REPO/.venv/bin/python" -m pipeline quality --docs "$EXP/docs" --jobs 2 ${DRY_RUN:+--dry-run} "$@")
}

(while sleep 600; do date; S4MIM_RUNS=$EXP/runs "$S4MIM" runs export "$EXPORT" | tail -1; done) \
  >> "$EXP/exporter.log" 2>&1 &
exporter=$!
trap 'kill $exporter 2>/dev/null' EXIT
trap 'exit 143' TERM INT

set -x
# The design trials on development seed 0 are done (docs/results.md lists each, and their tables). At
# the frozen defaults, seed 0's table comes from the stage cache: the kept knob's trial runs are the
# runs of the rows that read it. Then seeds 1 and 2 (each command trains two runs at a time), the
# development table of the three seeds, and the held-out generator seeds 3 and 4 (three training
# seeds each, one table pooling the six pairs).
q --seeds 0
q --seeds 1
q --seeds 2
q
q --synth-seed 3 --synth-seed 4
