#!/bin/bash
# The testbed ablation's development runs, in the order its plan gives (docs/results.md), on a 2-core
# machine: two runs side by side at all times (two quality commands that share a stage wait for each
# other: quality runs its stages with --wait), from a frozen copy of this checkout (Ray workers import
# the code as it is when each stage starts), with every finished and interrupted stage exported into
# this folder every 10 minutes, so that a replaced machine loses at most those minutes.
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
# Development seed 0: the seven rows, then the design trials, one row at a time in each of two lanes.
# A trial of several rows gets a command per row here, and its table once every row has finished.
(q --seeds 0
 q --seeds 0 --trial smim.pixels=visible --variant s4mim
 q --seeds 0 --trial smim.weight=0.1 --variant s4mim
 q --seeds 0 --trial fa.weight=0.3 --variant s4mim
 q --seeds 0 --trial mim.patch=16 --variant s4mim
 q --seeds 0 --trial mim.input=whole --variant s4mim
 # mim.patch=16 is decided without its plain-MIM row: its CMIM + FA row lost more than 0.5 (the rule's
 # veto). Both lanes go on with seed 1's rows that no remaining trial changes, one run at a time (the
 # supervised rows' command has unimatch as its reference: it trains them one after the other while
 # waiting for lane 1's unimatch run, which it shares).
 q --seeds 1 --variant unimatch
 q --seeds 1 --variant mim) > "$EXP/lane1.log" 2>&1 &
lane1=$!
(q --seeds 0 --trial smim.view=weak --variant s4mim
 q --seeds 0 --trial smim.ratio=0.25 --variant s4mim
 q --seeds 0 --trial fa.weight=0.3 --variant cmim-fa
 q --seeds 0 --trial mim.patch=16 --variant cmim
 q --seeds 0 --trial mim.patch=16 --variant cmim-fa
 q --seeds 0 --trial mim.input=whole --variant cmim
 q --seeds 0 --trial mim.input=whole --variant cmim-fa
 q --seeds 1 --variant supervised-steps --variant supervised-epochs) > "$EXP/lane2.log" 2>&1 &
lane2=$!
wait $lane1 $lane2
# the tables of the trials of several rows, from their finished runs
q --seeds 0 --trial fa.weight=0.3 --variant cmim-fa --variant s4mim
q --seeds 0 --trial mim.patch=16 --variant cmim --variant cmim-fa --variant s4mim
q --seeds 0 --trial mim.input=whole --variant cmim --variant cmim-fa --variant s4mim
# seeds 1 and 2: each command fills both lanes itself
q --seeds 1
q --seeds 2
