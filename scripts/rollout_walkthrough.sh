#!/bin/bash
# The docs/ROLLOUT.md walkthrough: prune a 2:4 candidate, serve it beside dense with a canary
# policy, load it until the rollout completes; then the same with a collapsed candidate, which
# is rolled back. Every command and its output go to DIR/log. Needs ports 8000 and 8080 free.
#   scripts/rollout_walkthrough.sh [DIR]      (default runs/rollout-walk; must not exist)
set -u
cd "$(dirname "$0")/.."
W=${1:-runs/rollout-walk}
if [ -e "$W" ]; then echo "rollout_walkthrough: $W exists; give a new directory" >&2; exit 2; fi
mkdir -p "$W"
exec > >(tee "$W/log") 2>&1
PY=.venv/bin/python
SERVE=
trap '[ -n "$SERVE" ] && { kill -TERM $SERVE 2>/dev/null; wait $SERVE; }' EXIT  # a serve.local left running

show() { echo "\$ $*"; "$@"; }  # print a command as the docs show it, then run it
prune() { echo "\$ $PY -m sinkprune prune $*"; $PY -m sinkprune prune "$@" 2>&1 | grep -E "^(method|pruned|quality)"; }

serve_with() {  # serve dense + the artifact $1 with the policy, until stop_serving
  $PY -m serve.local --pruned "$1" --router-config "$W/router.yaml" --port 8000 --metrics-port 8080 \
    > "$W/serve-$(basename "$1").log" 2>&1 &
  SERVE=$!
  for _ in $(seq 1 120); do curl -sf 127.0.0.1:8000/healthz >/dev/null && break; sleep 2; done
}

stop_serving() { kill -TERM $SERVE; wait $SERVE; SERVE=; }

load_and_watch() {  # the load test (its arguments), one line of the canary's progress every 10 s
  echo "\$ $PY -m loadtest $*"
  $PY -m loadtest "$@" --quiet &
  local load=$!
  while kill -0 $load 2>/dev/null; do
    curl -s 127.0.0.1:8000/rollout | $PY scripts/rollout_line.py
    sleep 10
  done
  wait $load
}

date -u
started=$SECONDS
prune --model embedded --pattern 2:4 --out-dir "$W/pruned"  # the default method (README: how it is chosen)
echo "($((SECONDS - started)) s)"
cat > "$W/router.yaml" <<'YAML'
quality: {sample_rate: 0.5, samples: 8, max_busy: 2}
cost: {cpu_replica_hour: 0.10, window_s: 120}
canary:
  variant: pruned
  baseline: dense
  steps: [0.1, 0.5, 1.0]
  min_requests: 10
  min_seconds: 20
  min_pairs: 8
  gates: {max_error_rate: 0.02, max_p99_latency_ratio: 2.0, max_quality_gap: 0.5}
YAML
show cat "$W/router.yaml"

serve_with "$W/pruned"
show curl -s 127.0.0.1:8000/rollout; echo
curl -s 127.0.0.1:8080/metrics > "$W/metrics-before.txt"
load_and_watch --num-prompts 200 --request-rate 1 --max-concurrency 4 --output-len 16 --extra-body '{"steps": 16}' \
  --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99 --goodput e2el:4000 --max-seconds 400 \
  --out-dir "$W/load"
sleep 15  # one metrics export period after the last request
curl -s 127.0.0.1:8080/metrics > "$W/metrics-after.txt"
echo "\$ curl -s 127.0.0.1:8000/rollout"; curl -s 127.0.0.1:8000/rollout | $PY -m json.tool
show $PY -m loadtest.report --run "routed=$W/load" --pruned-artifact "$W/pruned" \
  --metrics-before "$W/metrics-before.txt" --metrics-after "$W/metrics-after.txt" --price-per-hour 0.10 \
  --out-dir "$W/report"
stop_serving
date -u

echo "## part 2: a collapsed candidate"
prune --model embedded --method magnitude --pattern unstructured:0.75 --out-dir "$W/u75"
prune --model "$W/u75" --method magnitude --pattern 2:4 --out-dir "$W/collapsed"
serve_with "$W/collapsed"
load_and_watch --num-prompts 100 --request-rate 1 --max-concurrency 4 --output-len 16 --extra-body '{"steps": 16}' \
  --max-seconds 300 --out-dir "$W/load2"
echo "\$ curl -s 127.0.0.1:8000/rollout"; curl -s 127.0.0.1:8000/rollout | $PY -m json.tool
$PY -c "import json; s = json.load(open('$W/load2/summary.json'))['phases'][0]['summary']; print({v: x['completed'] for v, x in s.items()})"
stop_serving
date -u
