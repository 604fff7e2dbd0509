"""`python -m benchmarks.cusparselt_algs`: which of cuSPARSELt's algorithms run, and how fast, on this GPU.

cuSPARSELt's default algorithm (id 0) was 0.27-1.02x dense on an H200, and both its own search and plans made
with ids above 0 crashed the process there (a segfault inside the library). This survey finds out which do
and why, with every plan in a child process (`sinkkernels.isolated`) so that a crash costs one task:

1. id 0 for every served (fused) linear shape of LLaDA-8B and Dream-7B at the engine's M values: the dense
   time, the default's time, and how many ids the library offers;
2. one probe per id above 0 (first shape, M = 256); ids whose probe crashes are not tried again;
3. the ids that survived, everywhere. Each of these tasks also compresses the weight through its plan
   (`cusparseLtSpMMACompress`) and says whether that equals the plan-free compression the serving path uses:
   a layout that differs per algorithm would explain a crash and rule the id out for serving;
4. cuSPARSELt's own search, given a 256 MiB workspace (the one that crashed had the default id's), once per
   shape at M = 1024, stopped after its first crash.

It writes the raw entries, a table per (shape, M) of dense / id 0 / the fastest id, and with `--table` the
algorithms the serving path may use (`SINKSERVE_CUSPARSELT_ALGS`, `sinkkernels.cusparselt`): the fastest id per
(N, K, M) that ran, matched id 0's accuracy and shares the serving path's compressed layout. With
`--sanitize`, the first crash is run again alone under `compute-sanitizer` and its report kept.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from sinkprune.dlm import DLMConfig
from sinkprune.dlm.presets import PRESETS

M_VALUES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the engine's block passes (rows x 32) and full passes
PROBE_M, SEARCH_M = 256, 1024
SEARCH_WORKSPACE = 256 << 20
ERROR_SLACK = 2.0  # an id may be this many times less accurate than id 0 (bf16 summation order), not more


def served_shapes(config: DLMConfig) -> list[tuple[int, int]]:
    """(N, K) of the linears a replica serves: q/k/v fused, the output projection, gate/up fused, down."""
    q, kv, d, ffn = (config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.hidden_size,
                     config.intermediate_size)
    return [(q + 2 * kv, d), (d, q), (2 * ffn, d), (d, ffn)]


# ---- the child's side: one task, in a process that may die ----

@functools.cache
def _weight(n: int, k: int) -> torch.Tensor:
    from sinkkernels.testing import random_24_weight
    return random_24_weight(n, k, torch.bfloat16, "cuda", seed=n + k)


@functools.cache
def _descriptor_compressed(n: int, k: int) -> torch.Tensor:
    """The weight compressed as the serving path does (`CusparseLtWeight`: from its descriptor, for any plan)."""
    from sinkkernels.cusparselt import extension
    return extension().compress(_weight(n, k))


def measure(task: dict) -> dict:
    """Time one (N, K, M, algorithm) plan, or cuSPARSELt's search (`task["search"]`), against dense."""
    from benchmarks.bench_kernels import relative_error
    from sinkkernels.cusparselt import extension
    from sinkkernels.timing import time_cuda
    n, k, m = task["n"], task["k"], task["m"]
    weight = _weight(n, k)
    x = torch.randn(m, k, generator=torch.Generator("cuda").manual_seed(m), device="cuda", dtype=torch.bfloat16)
    reference = torch.nn.functional.linear(x, weight)
    plan = extension().Plan(n, k, m, "bfloat16", task.get("alg", 0), 0)
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    result = {"max_alg_id": plan.max_alg_id}
    compressed = _descriptor_compressed(n, k)
    if task.get("alg", 0) > 0:
        own = plan.compress_for_plan(weight)
        result["same_layout"] = own.numel() == compressed.numel() and bool(torch.equal(own, compressed))
        compressed = own
    if task.get("search"):
        result["alg"], result["split_k"] = plan.search(compressed, x, out, SEARCH_WORKSPACE)
    plan.run(compressed, x, out)
    torch.cuda.synchronize()
    result["max_rel_err"] = relative_error(out, reference)
    result["us"] = time_cuda(lambda: plan.run(compressed, x, out), task["warmup"], task["reps"]) * 1e6
    result["workspace_bytes"] = plan.workspace_bytes
    if task.get("alg", 0) == 0 and not task.get("search"):
        result["dense_us"] = time_cuda(lambda: torch.nn.functional.linear(x, weight), task["warmup"],
                                       task["reps"]) * 1e6
    return result


# ---- the parent's side ----

def plan_tasks(shapes: list[tuple[int, int]], m_values: tuple[int, ...], warmup: int, reps: int) -> list[dict]:
    return [{"n": n, "k": k, "m": m, "alg": 0, "warmup": warmup, "reps": reps} for n, k in shapes for m in m_values]


def probe_tasks(first: list[dict], shape: tuple[int, int], warmup: int, reps: int) -> list[dict]:
    """One task per id above 0 that the library offered for `shape` at PROBE_M (none if id 0 failed there)."""
    offered = [e["result"]["max_alg_id"] for e in first
               if e["state"] == "done" and (e["task"]["n"], e["task"]["k"], e["task"]["m"]) == (*shape, PROBE_M)]
    return [{"n": shape[0], "k": shape[1], "m": PROBE_M, "alg": alg, "warmup": warmup, "reps": reps}
            for alg in range(1, offered[0] + 1)] if offered else []


def survivors(probes: list[dict]) -> list[int]:
    return [e["task"]["alg"] for e in probes if e["state"] in ("done", "error")]


def grid_tasks(first: list[dict], algs: list[int], probed: tuple[int, int]) -> list[dict]:
    """Every surviving id for every (shape, M) where id 0 ran and the library offers that id, but the probes."""
    return [{**e["task"], "alg": alg} for alg in algs for e in first
            if e["state"] == "done" and alg <= e["result"]["max_alg_id"]
            and (e["task"]["n"], e["task"]["k"], e["task"]["m"]) != (*probed, PROBE_M)]


def summarize(entries: list[dict]) -> list[dict]:
    """Per (N, K, M): dense, id 0, and the fastest usable id (ran, as accurate as id 0 within ERROR_SLACK, and
    compressed like the serving path)."""
    rows = []
    base = {(e["task"]["n"], e["task"]["k"], e["task"]["m"]): e["result"] for e in entries
            if e["state"] == "done" and e["task"].get("alg") == 0 and not e["task"].get("search")}
    for key, zero in base.items():
        usable = [(e["result"]["us"], e["task"]["alg"]) for e in entries
                  if e["state"] == "done" and not e["task"].get("search")
                  and (e["task"]["n"], e["task"]["k"], e["task"]["m"]) == key
                  and e["result"]["max_rel_err"] <= ERROR_SLACK * max(zero["max_rel_err"], 1e-3)
                  and e["result"].get("same_layout", True)]
        best_us, best_alg = min(usable)
        rows.append({"n": key[0], "k": key[1], "m": key[2], "dense_us": zero["dense_us"], "alg0_us": zero["us"],
                     "best_alg": best_alg, "best_us": best_us, "best_vs_dense": zero["dense_us"] / best_us,
                     "best_vs_alg0": zero["us"] / best_us})
    return rows


def serving_table(rows: list[dict], device: str, version: str) -> dict:
    """The ids the serving path may use: where an id above 0 beats id 0."""
    return {"device": device, "cusparselt": version,
            "algorithms": {f"{r['n']},{r['k']},{r['m']}": r["best_alg"] for r in rows if r["best_alg"] != 0}}


def markdown(rows: list[dict], entries: list[dict]) -> str:
    lines = ["| N | K | M | dense us | id 0 us | fastest id | its us | vs dense | vs id 0 |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['n']} | {r['k']} | {r['m']} | {r['dense_us']:.1f} | {r['alg0_us']:.1f} | {r['best_alg']} | "
              f"{r['best_us']:.1f} | {r['best_vs_dense']:.2f}x | {r['best_vs_alg0']:.2f}x |" for r in rows]
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry["state"]] = counts.get(entry["state"], 0) + 1
    lines.append("\ntasks: " + ", ".join(f"{state} {count}" for state, count in sorted(counts.items())))
    crashed = sorted({(e["task"].get("alg"), bool(e["task"].get("search"))) for e in entries
                      if e["state"] in ("crashed", "timed out")})
    if crashed:
        lines.append("crashed or hung: " + ", ".join("search" if search else f"id {alg}" for alg, search in crashed))
    return "\n".join(lines)


def sanitize(entries: list[dict], folder: Path, seconds: float) -> str | None:
    """Run the first crashed task again alone under compute-sanitizer; its report, or why not."""
    from sinkkernels.isolated import run_isolated
    crashed = [e["task"] for e in entries if e["state"] == "crashed"]
    tool = shutil.which("compute-sanitizer")
    if not crashed or tool is None:
        return None if not crashed else "compute-sanitizer is not on PATH"
    run_isolated("benchmarks.cusparselt_algs:measure", crashed[:1], folder / "sanitize", seconds, seconds,
                 command_prefix=(tool, "--tool", "memcheck", "--print-limit", "20"))
    return (folder / "sanitize" / "children.log").read_text()[-20000:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cusparselt_algs", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(PRESETS), default=sorted(PRESETS))
    parser.add_argument("--m", type=lambda t: tuple(int(v) for v in t.split(",")), default=M_VALUES,
                        help="comma-separated M values, multiples of 16 (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=420, help="time box for the whole survey")
    parser.add_argument("--task-seconds", type=float, default=90, help="a task running longer is killed")
    parser.add_argument("--sanitize", action="store_true", help="rerun the first crash under compute-sanitizer")
    parser.add_argument("--out", type=Path, default=Path("runs/cusparselt_algs.json"))
    parser.add_argument("--table", type=Path, help="also write the serving path's algorithm table here")
    args = parser.parse_args(argv)
    if any(m < 16 or m % 16 for m in args.m):
        parser.error(f"--m {','.join(map(str, args.m))}: every M must be a positive multiple of 16")
    if not torch.cuda.is_available():
        print("cusparselt_algs: needs a CUDA GPU (cuSPARSELt runs on sparse tensor cores)", file=sys.stderr)
        return 2
    from tqdm import tqdm

    from sinkkernels.cusparselt import extension
    from sinkkernels.isolated import run_isolated
    version = extension().version()  # built here, once, before any child needs it
    shapes = sorted({shape for name in args.models
                     for shape in served_shapes(DLMConfig.from_hf_config(PRESETS[name]))})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # the children's journals and logs: a folder of our own, whose logs the report keeps, removed at the end
    work = Path(tempfile.mkdtemp(prefix=".cusparselt_algs-", dir=args.out.parent))
    started = datetime.datetime.now(datetime.timezone.utc)
    deadline = started.timestamp() + args.seconds

    def phase(name: str, tasks: list[dict]) -> list[dict]:
        left = deadline - datetime.datetime.now(datetime.timezone.utc).timestamp()
        with tqdm(total=len(tasks), desc=name, unit="task") as bar:
            return run_isolated("benchmarks.cusparselt_algs:measure", tasks, work / name, args.task_seconds,
                                max(left, 1.0), on_progress=lambda done: bar.update(done - bar.n))

    first = phase("default", plan_tasks(shapes, args.m, args.warmup, args.reps))
    probes = phase("probe", probe_tasks(first, shapes[0], args.warmup, args.reps)) if PROBE_M in args.m else []
    grid = phase("grid", grid_tasks(first, survivors(probes), shapes[0]))
    search_tasks = [{"n": n, "k": k, "m": SEARCH_M, "search": True, "warmup": args.warmup, "reps": args.reps}
                    for n, k in shapes] if SEARCH_M in args.m else []
    searched = []
    for index, task in enumerate(search_tasks):  # one child each; the first crash ends the phase
        searched += phase(f"search{index}", [task])
        if searched[-1]["state"] in ("crashed", "timed out"):
            break
    entries = first + probes + grid + searched
    rows = summarize(entries)
    device = torch.cuda.get_device_name()
    report = {"device": device, "torch": torch.__version__, "cusparselt": version,
              "date": started.isoformat(timespec="seconds"),
              "command": " ".join(["python -m benchmarks.cusparselt_algs", *(sys.argv[1:] if argv is None else argv)]),
              "rows": rows, "entries": entries}
    if args.sanitize:
        report["sanitizer"] = sanitize(entries, work, args.task_seconds * 2)
    report["child_logs"] = {log.parent.name: log.read_text()[-20000:] for log in sorted(work.glob("*/children.log"))
                            if log.parent.name != "sanitize"}
    shutil.rmtree(work)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(rows, entries))
    if args.table:
        args.table.write_text(json.dumps(serving_table(rows, device, version), indent=1) + "\n")
        print(f"wrote {args.table}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
