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
trap '[ -n "$SERVE" ] && kill -TERM $SERVE 2>/dev/null; wait' EXIT
date -u
echo '$ sinkprune prune --model embedded --method sink-wanda --pattern 2:4 --out-dir '"$W"'/pruned'
/usr/bin/time -f "%e s" $PY -m sinkprune prune --model embedded --method sink-wanda --pattern 2:4 --out-dir $W/pruned 2>&1 | grep -v "it/s\]" | tail -8
cat > $W/router.yaml <<'YAML'
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
echo '$ cat '"$W"'/router.yaml'; cat $W/router.yaml
$PY -m serve.local --pruned $W/pruned --router-config $W/router.yaml --port 8000 --metrics-port 8080 > $W/serve.log 2>&1 &
SERVE=$!
for i in $(seq 1 120); do curl -sf 127.0.0.1:8000/healthz >/dev/null && break; sleep 2; done
echo '$ curl -s 127.0.0.1:8000/rollout'; curl -s 127.0.0.1:8000/rollout; echo
curl -s 127.0.0.1:8080/metrics > $W/metrics-before.txt
echo '$ python -m loadtest --num-prompts 200 --request-rate 1 --max-concurrency 4 --output-len 16 --extra-body {"steps": 16} --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99 --goodput e2el:4000 --max-seconds 400 --out-dir '"$W"'/load --quiet'
$PY -m loadtest --num-prompts 200 --request-rate 1 --max-concurrency 4 --output-len 16 --extra-body '{"steps": 16}' \
   --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99 --goodput e2el:4000 --max-seconds 400 \
   --out-dir $W/load --quiet &
LOAD=$!
while kill -0 $LOAD 2>/dev/null; do
  curl -s 127.0.0.1:8000/rollout | $PY scripts/rollout_line.py
  sleep 10
done
wait $LOAD
sleep 15
curl -s 127.0.0.1:8080/metrics > $W/metrics-after.txt
echo '$ curl -s 127.0.0.1:8000/rollout'; curl -s 127.0.0.1:8000/rollout | $PY -m json.tool
echo '$ python -m loadtest.report --run routed='"$W"'/load --pruned-artifact '"$W"'/pruned --metrics-before '"$W"'/metrics-before.txt --metrics-after '"$W"'/metrics-after.txt --price-per-hour 0.10 --out-dir '"$W"'/report'
$PY -m loadtest.report --run routed=$W/load --pruned-artifact $W/pruned --metrics-before $W/metrics-before.txt \
   --metrics-after $W/metrics-after.txt --price-per-hour 0.10 --out-dir $W/report
grep -i "canary" $W/serve.log | tail -6
kill -TERM $SERVE; wait $SERVE; SERVE=
date -u
echo '## part 2: a collapsed candidate'
echo '$ sinkprune prune --model embedded --method magnitude --pattern unstructured:0.75 --out-dir '"$W"'/u75'
$PY -m sinkprune prune --model embedded --method magnitude --pattern unstructured:0.75 --out-dir $W/u75 2>&1 | grep -v "it/s\]" | tail -2
echo '$ sinkprune prune --model '"$W"'/u75 --method magnitude --pattern 2:4 --out-dir '"$W"'/collapsed'
$PY -m sinkprune prune --model $W/u75 --method magnitude --pattern 2:4 --out-dir $W/collapsed 2>&1 | grep -v "it/s\]" | tail -2
$PY -m serve.local --pruned $W/collapsed --router-config $W/router.yaml --port 8000 --metrics-port 8080 > $W/serve2.log 2>&1 &
SERVE=$!
for i in $(seq 1 120); do curl -sf 127.0.0.1:8000/healthz >/dev/null && break; sleep 2; done
echo '$ python -m loadtest --num-prompts 100 --request-rate 1 --max-concurrency 4 --output-len 16 --extra-body {"steps": 16} --out-dir '"$W"'/load2 --quiet'
$PY -m loadtest --num-prompts 100 --request-rate 1 --max-concurrency 4 --output-len 16 --extra-body '{"steps": 16}' \
   --max-seconds 300 --out-dir $W/load2 --quiet &
LOAD=$!
while kill -0 $LOAD 2>/dev/null; do
  curl -s 127.0.0.1:8000/rollout | $PY scripts/rollout_line.py
  sleep 10
done
wait $LOAD
echo '$ curl -s 127.0.0.1:8000/rollout'; curl -s 127.0.0.1:8000/rollout | $PY -c "import json,sys; d=json.load(sys.stdin); print(json.dumps({'weights': d['weights'], 'status': d['canary']['status'], 'decisions': d['canary']['decisions']}, indent=1))"
$PY -c "import json; s=json.load(open('$W/load2/summary.json'))['phases'][0]['summary']; print({v: x['completed'] for v, x in s.items()})"
grep -i "canary" $W/serve2.log | tail -4
kill -TERM $SERVE; wait $SERVE; SERVE=
date -u
