#!/usr/bin/env bash
# PPO demo, end to end on CPU (README.md beside this file has the results):
#   1. start the judge service (`rlaif serve`, embedded SmolLM2 judge) on 127.0.0.1;
#   2. `rlaif ppo` with config.yaml against it: the embedded policy, pairwise reward vs its
#      initial greedy answers, ~20 steps;
#   3. `rlaif winrate`: trained policy vs initial policy on held-out prompts, judged by the service.
# Usage: bash examples/ppo_demo/run.sh            (from anywhere; ~15-30 min on 2 CPU cores)
#   env: PORT (8765), OUT (runs/ppo_demo), STEPS (20), WINRATE_TOKENS (64), COPY_PLOTS=1 copies
#   the PNG and win-rate JSON next to this script. On a busy machine prefix OMP_NUM_THREADS=1:
#   two spinning OpenMP threads sharing loaded cores are far slower than one.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE/../.."
PORT="${PORT:-8765}"
OUT="${OUT:-runs/ppo_demo}"
STEPS="${STEPS:-20}"
WINRATE_TOKENS="${WINRATE_TOKENS:-64}"
URL="http://127.0.0.1:${PORT}"
PYTHON="${PYTHON:-python}"

if [ -e "$OUT" ]; then
  echo "$OUT exists; remove it or set OUT=... (add --resume in this script to continue a run)" >&2
  exit 1
fi
mkdir -p "$OUT"

"$PYTHON" -m rlaif serve --port "$PORT" --log-level warning >"$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT

echo "waiting for the judge service at $URL ..."
for _ in $(seq 1 600); do
  if curl -fsS "$URL/readyz" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$SERVER" 2>/dev/null; then echo "rlaif serve exited:" >&2; cat "$OUT/serve.log" >&2; exit 1; fi
  sleep 1
done
curl -fsS "$URL/readyz" >/dev/null || { echo "judge service not ready after 10 min" >&2; exit 1; }

START=$(date +%s)
"$PYTHON" -m rlaif ppo --config "$HERE/config.yaml" --judge-url "$URL" --output-dir "$OUT" --steps "$STEPS"
TRAINED=$(date +%s)

"$PYTHON" -m rlaif winrate --base default --policy "$OUT" --prompts "$HERE/prompts_heldout.jsonl" \
  --judge-url "$URL" --max-new-tokens "$WINRATE_TOKENS" --out "$OUT/winrate" | tee "$OUT/winrate.json"
END=$(date +%s)
echo "training: $((TRAINED - START)) s, win rate: $((END - TRAINED)) s" | tee "$OUT/timing.txt"

if [ "${COPY_PLOTS:-0}" = "1" ]; then
  cp "$OUT/training_curves.png" "$HERE/training_curves.png"
  cp "$OUT/winrate/summary.json" "$HERE/winrate_summary.json"
  cp "$OUT/metrics.jsonl" "$HERE/metrics.jsonl"
fi
