#!/usr/bin/env bash
# Regenerates the published leaderboard in leaderboard/: every method tuned with the same budget on
# validation data, then seeds of its best config on the test split (5 on digits, 3 on CIFAR-10), then the page.
#   leaderboard/publish.sh [digits|cifar10|all] [build]
# TRIALS_DIGITS (default 24) and TRIALS_CIFAR10 (default 12): the trials of each method's study; TPE starts
# from about a third of them (trial 0 = the defaults, then random draws) and samples the rest itself.
# WORKERS (default 2 processes), DATA_ROOT (holds cifar10-jpeg/) and MLFLOW_TRACKING_URI (default:
# publish/mlflow.db in the working directory) may be set. Studies and sweeps resume where they stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=${BENCH:-.venv/bin/bench}
TRIALS_DIGITS=${TRIALS_DIGITS:-24}
TRIALS_CIFAR10=${TRIALS_CIFAR10:-12}
WORKERS=${WORKERS:-2}
DATA_ROOT=${DATA_ROOT:-../shared/data}
mkdir -p publish
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/publish/mlflow.db}
METHODS="fedavg fedavg_ft fedbn fedper fedperfix fedrep local partial pfedhn"
what=${1:-all}
# `bench tune` writes STUDY.best_config.toml in the working directory; keep them with the store.
keep_best() { mv -f ./*-publish.best_config.toml publish/ 2>/dev/null || true; }

if [[ $what == digits || $what == all ]]; then
  # The demo preset cut to 10 rounds, 2 local epochs (not searched), evaluated every 5 rounds.
  for m in $METHODS; do
    $BENCH tune --method "$m" --dataset digits --preset demo --set train.rounds=10 --set train.local_epochs=2 \
      --set train.eval_every=5 --trials "$TRIALS_DIGITS" --workers "$WORKERS" --study "$m-digits-publish" \
      --experiment leaderboard --quiet
  done
  keep_best
  $BENCH sweep leaderboard/suites/digits.toml --workers "$WORKERS" --quiet
fi
if [[ $what == cifar10 || $what == all ]]; then
  # Tuned on 5 of cpu-cifar10's 20 rounds (one evaluation, at the end), local epochs and batch size
  # held at the preset's 1 and 64 (not searched), so that it fits a 2-core CPU; the final runs
  # (suites/cifar10.toml) take the best config back to all 20 rounds.
  for m in $METHODS; do
    $BENCH tune --method "$m" --dataset imagefolder --preset cpu-cifar10 --data-root "$DATA_ROOT" \
      --set train.rounds=5 --set train.eval_every=5 --set train.local_epochs=1 --set train.batch_size=64 \
      --trials "$TRIALS_CIFAR10" --workers "$WORKERS" --study "$m-cifar10-publish" --experiment leaderboard --quiet
  done
  keep_best
  $BENCH sweep leaderboard/suites/cifar10.toml --data-root "$DATA_ROOT" --workers "$WORKERS" --quiet
fi
if [[ ${2:-build} == build ]]; then
  rm -f leaderboard/pareto-*.png  # plots of settings no longer published
  $BENCH leaderboard --experiment leaderboard --out leaderboard \
    --budget "every method tuned with the same Optuna TPE budget on validation data, $TRIALS_DIGITS trials on digits and $TRIALS_CIFAR10 on CIFAR-10 (trial 0 = its defaults, about a third random starts, the rest TPE; lr, momentum, weight decay and, on digits, batch size, plus the method's own space; budget keys such as epochs, fine-tuning length and plugin width are never searched), then its best config on the test split: seeds 0-4 on digits, 0-2 on CIFAR-10. digits: the demo preset cut to 10 rounds, 2 local epochs. CIFAR-10 (JPEG, image folder): trials on 5 of cpu-cifar10's 20 rounds, final runs on all 20; local epochs 1 and batch 64. Run on a 2-core CPU"
  # How a browser renders the page (headless Chromium), where one is installed.
  if command -v chromium >/dev/null; then
    chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,2600 \
      --screenshot="$PWD/leaderboard/screenshot.png" "file://$PWD/leaderboard/index.html" 2>/dev/null
  fi
fi
