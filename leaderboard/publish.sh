#!/usr/bin/env bash
# Regenerates the published leaderboard in leaderboard/: every method tuned with the same budget on
# validation data, then 3 seeds of its best config on the test split, then the page.
#   leaderboard/publish.sh [digits|cifar10|all] [build]
# TRIALS (default 2: the defaults + 1 TPE draw), DATA_ROOT (holds cifar10-jpeg/) and
# MLFLOW_TRACKING_URI (default: publish/mlflow.db in the working directory) may be set.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=${BENCH:-.venv/bin/bench}
TRIALS=${TRIALS:-2}
DATA_ROOT=${DATA_ROOT:-../shared/data}
mkdir -p publish
# `bench tune` writes STUDY.best_config.toml in the working directory; keep them with the store.
keep_best() { mv -f ./*-publish.best_config.toml publish/ 2>/dev/null || true; }
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/publish/mlflow.db}
METHODS="fedavg fedavg_ft fedbn fedper fedperfix fedrep local pfedhn"
what=${1:-all}

if [[ $what == digits || $what == all ]]; then
  # The demo preset cut to 10 rounds, 2 local epochs (not searched), evaluated every 5 rounds.
  for m in $METHODS; do
    $BENCH tune --method "$m" --dataset digits --preset demo --set train.rounds=10 --set train.local_epochs=2 \
      --set train.eval_every=5 --trials "$TRIALS" --study "$m-digits-publish" --experiment leaderboard --quiet
  done
  keep_best
  $BENCH sweep leaderboard/suites/digits.toml --quiet
fi
if [[ $what == cifar10 || $what == all ]]; then
  # cpu-cifar10 cut to 2 rounds (one evaluation, at the end), local epochs and batch size held at the
  # preset's 1 and 64 (not searched): so that it fits a shared 2-core CPU.
  for m in $METHODS; do
    $BENCH tune --method "$m" --dataset imagefolder --preset cpu-cifar10 --data-root "$DATA_ROOT" \
      --set train.rounds=2 --set train.eval_every=2 --set train.local_epochs=1 --set train.batch_size=64 --trials "$TRIALS" --study "$m-cifar10-publish" \
      --experiment leaderboard --quiet
  done
  keep_best
  $BENCH sweep leaderboard/suites/cifar10.toml --data-root "$DATA_ROOT" --quiet
fi
if [[ ${2:-build} == build ]]; then
  $BENCH leaderboard --experiment leaderboard --out leaderboard \
    --budget "each method tuned with $TRIALS Optuna trials on validation data (trial 0 = its defaults), then 3 seeds"
fi
