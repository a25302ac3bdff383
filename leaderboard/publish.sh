#!/usr/bin/env bash
# Regenerates the published leaderboard in leaderboard/: every method tuned with the same budget on
# validation data, then seeds of its best config on the test split (5 on digits, 3 on CIFAR-10), then the page.
#   leaderboard/publish.sh [digits|cifar10|all|paper] [build]
# all = digits and cifar10 (CPU). paper = the FedPerfix paper's Table 2 in one command (GPU): the
# suite's plan and GPU-hour estimate first, then with TRIALS=0 the reference code's hyperparameters
# as the paper ran them, otherwise each method tuned first (TRIALS trials, default 12) on TUNE_ROUNDS
# (default 10) rounds with a 15% validation split, the final runs starting from its best config.
# TRIALS_DIGITS (default 24) and TRIALS_CIFAR10 (default 12): the trials of each method's study; TPE starts
# from about a third of them (trial 0 = the defaults, then random draws) and samples the rest itself.
# WORKERS (default 2 processes), DATA_ROOT (holds cifar10-jpeg/, and for paper the CIFAR-100, OrganAMNIST
# and Office-Home files), MLFLOW_TRACKING_URI (default: publish/mlflow.db in the working directory),
# PAPER_SUITE (default leaderboard/suites/paper.toml) and OUT (where the page goes, default leaderboard)
# may be set. Studies and sweeps resume where they stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=${BENCH:-.venv/bin/bench}
TRIALS_DIGITS=${TRIALS_DIGITS:-24}
TRIALS_CIFAR10=${TRIALS_CIFAR10:-12}
TRIALS=${TRIALS:-12}
WORKERS=${WORKERS:-2}
DATA_ROOT=${DATA_ROOT:-../shared/data}
TUNE_ROUNDS=${TUNE_ROUNDS:-10}
PAPER_SUITE=${PAPER_SUITE:-leaderboard/suites/paper.toml}
OUT=${OUT:-leaderboard}
mkdir -p publish
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/publish/mlflow.db}
METHODS="fedavg fedavg_ft fedbn fedper fedperfix fedrep local partial pfedhn"
what=${1:-all}
# `bench tune` writes STUDY.best_config.toml in the working directory; keep them with the store.
keep_best() { mv -f ./*-publish.best_config.toml ./*-paper.best_config.toml publish/ 2>/dev/null || true; }

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
if [[ $what == paper ]]; then
  # What will run and the GPU hours it needs, before anything starts (exit 2 on an unregistered method).
  $BENCH plan "$PAPER_SUITE" --experiment leaderboard --data-root "$DATA_ROOT" --trials "$TRIALS" \
    --tune-rounds "$TUNE_ROUNDS"
  best_of=()
  if (( TRIALS > 0 )); then
    # One study per method and setting, on a 15% validation split (the presets hold none) and fewer
    # rounds; local epochs and batch size stay the reference's (not searched). The suite's overrides
    # give the final runs the paper's setting back.
    $BENCH plan "$PAPER_SUITE" --experiment leaderboard --studies | while read -r m dataset preset; do
      $BENCH tune --method "$m" --dataset "$dataset" --preset "$preset" --data-root "$DATA_ROOT" \
        --set data.val_fraction=0.15 --set train.rounds="$TUNE_ROUNDS" --set train.eval_every="$TUNE_ROUNDS" \
        --set train.local_epochs=10 --set train.batch_size=64 --trials "$TRIALS" --workers "$WORKERS" \
        --study "$m-$dataset-paper" --experiment leaderboard --quiet < /dev/null
    done
    keep_best
    best_of=(--best-of "{method}-{dataset}-paper")
  fi
  $BENCH sweep "$PAPER_SUITE" --data-root "$DATA_ROOT" --workers "$WORKERS" "${best_of[@]}" --quiet
fi
if [[ ${2:-build} == build ]]; then
  if (( TRIALS > 0 )); then paper="$TRIALS trials each, on $TUNE_ROUNDS rounds with a 15% validation split"
  else paper="the reference code's hyperparameters, untuned, as the paper ran them"; fi
  mkdir -p "$OUT"
  rm -f "$OUT"/pareto-*.png "$OUT"/configs/*.toml  # plots and configs of cells no longer published
  $BENCH leaderboard --experiment leaderboard --out "$OUT" \
    --budget "every method tuned with the same Optuna TPE budget on validation data, $TRIALS_DIGITS trials on digits and $TRIALS_CIFAR10 on CIFAR-10 (trial 0 = its defaults, about a third random starts, the rest TPE; lr, momentum, weight decay and, on digits, batch size, plus the method's own space; budget keys such as epochs, fine-tuning length and plugin width are never searched), then its best config on the test split: seeds 0-4 on digits, 0-2 on CIFAR-10. digits: the demo preset cut to 10 rounds, 2 local epochs. CIFAR-10 (JPEG, image folder): trials on 5 of cpu-cifar10's 20 rounds, final runs on all 20; local epochs 1 and batch 64. Run on a 2-core CPU. The paper's settings (paper-* presets, on a GPU, when run): $paper"
  # How a browser renders the page (headless Chromium), where one is installed.
  if command -v chromium >/dev/null; then
    out=$(cd "$OUT" && pwd)
    chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,2600 \
      --screenshot="$out/screenshot.png" "file://$out/index.html" 2>/dev/null
  fi
fi
