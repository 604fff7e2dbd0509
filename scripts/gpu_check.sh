#!/usr/bin/env bash
# What a session with a GPU runs to verify and measure the CUDA paths, in one command. Each stage writes
# its output to OUT/<stage>.txt (and JSON/PNG beside it), ready for docs/BENCHMARKS.md; a failing stage
# does not stop the others, and the exit status is 1 if any failed.
#
#   scripts/gpu_check.sh [OUT] [STAGE ...]     stages: env ext tests compile bench algs arena step serving (default: all)
#
# Every stage is time-boxed (STAGE_SECONDS, default 240; algs and serving 480) so an overrun loses only that stage;
# ALGS_ARGS replaces the cuSPARSELt algorithm survey's arguments after --out/--table; BENCH_ARGS
# replaces the kernel benchmark's default arguments (for a shorter run), STEP_ARGS adds to the step benchmark's,
# SERVING_ARGS to the serving benchmark's.
#
# PYTHON (default python3, which holds torch on the lent GPU machines) runs everything; it needs torch with
# CUDA, triton, pytest, tqdm, matplotlib, transformers and safetensors, and no Ray. Which stages to run in which of a
# session's calls (each inside 10 minutes): docs/BENCHMARKS.md, "Running it again".
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_check}
shift $(( $# > 0 ? 1 : 0 ))
stages=("${@:-env ext tests compile bench algs arena step serving}")
stages=(${stages[*]})
for stage in "${stages[@]}"; do
    case $stage in
        env|ext|tests|compile|bench|algs|arena|step|serving) ;;
        *) echo "gpu_check: unknown stage '$stage' (stages: env ext tests compile bench algs arena step serving)" >&2; exit 2 ;;
    esac
done
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
failed=0

run_stage() {
    local name=$1
    shift
    echo "== $name: $*"
    timeout "${STAGE_SECONDS:-240}" "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    # GPU_TAR: a tarball of everything written so far, refreshed after every stage (one file to bring back)
    [ -z "${GPU_TAR:-}" ] || tar czf "$GPU_TAR" -C "$out" .
    [ "$rc" -eq 0 ] || failed=1
}

for stage in "${stages[@]}"; do
    case $stage in
        env) run_stage env sh -c "nvidia-smi; date -u; $py -c 'import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"cuSPARSELt\", torch.backends.cusparselt.is_available()); print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())'" ;;
        ext) run_stage ext "$py" -c 'import time; from sinkkernels import cusparselt as c; print("found", c.find_library()); t = time.time(); e = c.extension(); print(f"cuSPARSELt {e.version()} extension built/loaded in {time.time() - t:.1f} s")' ;;
        tests) run_stage tests env SINKSERVE_TRITON_AUTOTUNE=0 "$py" -m pytest -q -p no:cacheprovider \
                   tests/test_kernels_cuda.py tests/test_engine_cuda.py tests/test_kernels_triton.py \
                   tests/test_kernels_linear.py tests/test_kernels_swap.py tests/test_kernels_formats.py \
                   tests/test_kernels_cusparselt.py tests/test_kernels_measure.py tests/test_elementwise.py ;;
        compile) run_stage compile "$py" -m benchmarks.compile_check --out "$out/compile_check.json" ;;
        bench) run_stage bench "$py" -m benchmarks.bench_kernels --out "$out/kernels_bench.json" \
                   --table "$out/dispatch_table.json" ${BENCH_ARGS:-} ;;
        # algs: which cuSPARSELt algorithms run (each plan in a child: a crash costs one task), the fastest usable
        # per (N, K, M), the table the serving path may load (SINKSERVE_CUSPARSELT_ALGS), the first crash sanitized
        algs) STAGE_SECONDS=${STAGE_SECONDS:-480} run_stage algs "$py" -m benchmarks.cusparselt_algs \
                  --out "$out/cusparselt_algs.json" --table "$out/cusparselt_algs_table.json" \
                  ${ALGS_ARGS:---seconds 300 --task-seconds 60 --sanitize} ;;
        # arena: a block pass's KV read at LLaDA's width, then with Dream's 7:1 grouped-query heads
        arena) run_stage arena_llada "$py" -m benchmarks.bench_arena --context 4096 --d-model 4096 --heads 32 \
                   --out "$out/arena_llada.json"
               run_stage arena_gqa "$py" -m benchmarks.bench_arena --context 4096 --d-model 3584 --heads 28 \
                   --kv-heads 4 --out "$out/arena_gqa.json" ;;
        step) run_stage step_llada "$py" -m benchmarks.bench_step --model llada-8b --out "$out/step_llada.json" \
                  ${STEP_ARGS:-}
              run_stage step_dream "$py" -m benchmarks.bench_step --model dream-7b --out "$out/step_dream.json" \
                  ${STEP_ARGS:-} ;;
        # serving: 12 configurations and 4 with threshold decoding, each warmed up, timed and profiled
        serving) STAGE_SECONDS=${STAGE_SECONDS:-480} run_stage serving env SINKSERVE_TRITON_AUTOTUNE=0 "$py" \
                     -m benchmarks.bench_serving --threshold 0.9 --out "$out/serving.json" ${SERVING_ARGS:-} ;;
    esac
done
exit $failed
