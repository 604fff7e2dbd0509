"""`python -m benchmarks.bench_step`: one denoising step of a 2:4-pruned model, dense kernels against sparse ones.

A DLM step is a full bidirectional forward over batch x seq tokens, so every
linear layer sees M = batch * seq rows; with the engine's dual cache, a block's
later steps compute only the block (M = batch * block: the memory-bound regime),
attending to cached keys before and after it, through the engine's own runner and KV
arena (eager). Both kinds of step are timed. This
measures what the A/B cost claim rests on: the same 2:4 weights (magnitude-pruned, every linear of the blocks) run as dense
`F.linear` (what the dense replica pays per step) and through each sparse backend
(`Sparse24Linear`, swapped in as the pruned replica does), per (batch, seq), timed
with CUDA events after warm-up (median). It also checks each backend's logits
against the dense ones and, on CUDA, the memory the swapped layers hold, and counts
the kernels one eager step launches (on a CPU: the operators that compute). A
backend named `X+fused` (or `fused`, for `nn.Linear`) runs with q/k/v and gate/up
fused as a replica serves them (`sinkprune.dlm.fusion`); `+compiled` (or `compiled`) with
the norm, rotary and SwiGLU chains compiled (`sinkprune.dlm.layers.compiled_elementwise`).

`--model llada-8b` / `dream-7b` builds the public shapes with random weights (no
checkpoint needed; `--layers N` keeps N blocks so a run fits the time or the GPU;
the embedding and head stay dense and are a fixed cost per step). `embedded` or a
local model directory loads real weights. On CPU only the `dense` backend runs
(and `triton` under TRITON_INTERPRET=1, slowly), so CPU numbers check the path,
not the speed.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import platform
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from benchmarks.bench_kernels import relative_error
from serve.engine.model_runner import ModelRunner
from serve.engine.sequence import PassPlan
from sinkkernels.timing import count_launches, time_cpu, time_cuda
from sinkkernels.dispatch import BACKENDS, BackendUnavailable
from sinkkernels.swap import swap_sparse_linears
from sinkprune.calibration import prunable_linears
from sinkprune.dlm import DLMConfig, build_model, load_model
from sinkprune.dlm.fusion import fuse_projections
from sinkprune.dlm.layers import compiled_elementwise
from sinkprune.dlm.model import DiffusionLM
from sinkprune.dlm.presets import PRESETS
from sinkprune.masks import nm_mask

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
AUTO = "auto"
BASELINE = "baseline: nn.Linear"
FUSED = "fused"  # alone: nn.Linear with q/k/v and gate/up fused; as a suffix (`auto+fused`): a backend after fusing
COMPILED = "compiled"  # likewise, with the elementwise chains compiled
MODIFIERS = (FUSED, COMPILED)


@dataclass
class StepRow:
    """One timed step: a full pass over `seq` positions, or (`block` set) a dual-cached pass over `block` of them."""

    backend: str
    batch: int
    seq: int
    block: int | None = None
    ms: float | None = None
    positions_per_s: float | None = None
    speedup: float | None = None
    launches: int | None = None  # kernels one eager step launches (CPU: operators that compute)
    skipped: str | None = None

    @property
    def kind(self) -> str:
        return "full" if self.block is None else f"dual cache, block {self.block}"

    @property
    def rows(self) -> int:
        """M: the rows every linear layer multiplies in this step."""
        return self.batch * (self.seq if self.block is None else self.block)


@dataclass
class BackendCheck:
    """A backend's logits against the dense ones on one input, and the bytes its swapped layers hold."""

    backend: str
    max_rel_err: float | None = None
    layer_bytes: int | None = None
    skipped: str | None = None


def build(model: str, layers: int | None, device: torch.device, dtype: torch.dtype, seed: int) -> DiffusionLM:
    """A preset with random weights (built on the device), or a checkpoint; then keep `layers` blocks."""
    if model in PRESETS:
        config = DLMConfig.from_hf_config(PRESETS[model])
        if layers is not None:
            config = dataclasses.replace(config, num_layers=layers)
        torch.manual_seed(seed)
        return build_model(config, device=device, dtype=dtype).eval()
    loaded, _ = load_model(model, device=device, dtype=dtype, with_tokenizer=False)
    if layers is not None:
        del loaded.blocks[layers:]
    return loaded


def prune_24(model: DiffusionLM) -> list[str]:
    """Magnitude 2:4 on every linear of the blocks (the method does not change the speed); returns their names."""
    linears = prunable_linears(model)
    with torch.no_grad():
        for linear in linears.values():
            linear.weight.mul_(nm_mask(linear.weight.abs(), 2, 4))
    return list(linears)


def _put(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@contextlib.contextmanager
def swapped(model: DiffusionLM, backend: str) -> Iterator[None]:
    """Every 2:4 linear replaced by `Sparse24Linear` on `backend` (`auto`: the dispatch plan), then put back."""
    before = dict(model.named_modules())
    names: list[str] = []
    try:
        names = swap_sparse_linears(model, backend=None if backend == AUTO else backend)
        yield
    finally:
        for name in names:
            _put(model, name, before[name])


@contextlib.contextmanager
def fused(model: DiffusionLM) -> Iterator[None]:
    """q/k/v and gate/up fused as a replica serves them, then the separate linears put back."""
    separate = {(module, name): getattr(module, name) for module in model.modules()
                for names in getattr(module, "fusions", {}).values() for name in names}
    try:
        fuse_projections(model)
        yield
    finally:
        for module in {module for module, _ in separate}:
            for fused_name in module.fusions:
                if getattr(module, fused_name, None) is not None:
                    delattr(module, fused_name)
                    setattr(module, fused_name, None)
        for (module, name), linear in separate.items():
            setattr(module, name, linear)


def split_label(label: str) -> tuple[str | None, frozenset[str]]:
    """(backend or None for nn.Linear, modifiers) of a `--backends` entry such as `triton`, `fused`,
    `auto+fused`, `fused+compiled`: a backend first if any, then modifiers among `MODIFIERS`."""
    first, *rest = label.split("+")
    base = None if first in MODIFIERS else first
    modifiers = rest if base is not None else [first, *rest]
    if base is not None and base not in BACKENDS + (AUTO,):
        raise ValueError(f"{label}: unknown backend {base}; choose among {', '.join(BACKENDS + (AUTO,))}")
    unknown = [m for m in modifiers if m not in MODIFIERS]
    if unknown or len(set(modifiers)) != len(modifiers):
        raise ValueError(f"{label}: modifiers are {' and '.join('+' + m for m in MODIFIERS)}, each at most once")
    return base, frozenset(modifiers)


def _tokens(config: DLMConfig, batch: int, seq: int, device: torch.device, seed: int) -> torch.Tensor:
    """Random tokens with half the positions masked, as in the middle of denoising."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.mask_token_id, (batch, seq), generator=generator)
    ids[torch.rand(batch, seq, generator=generator) < 0.5] = config.mask_token_id
    return ids.to(device)


def _step(model: DiffusionLM, ids: torch.Tensor, block: int | None):
    """The pass to time: the full sequence, or a middle block against the caches of the rest, the engine's
    dual-cache pass through its KV arena (eager: the engine's runner without CUDA graphs)."""
    if block is None:
        return lambda: model(ids)
    rows, seq = ids.shape
    cut, tokens, slots = (seq - block) // 2, ids.tolist(), list(range(rows))
    runner = ModelRunner(model, rows, seq, cuda_graphs=False)
    runner.prepare([PassPlan(row, 0, False, 0, True, (0, seq)) for row in tokens], slots).run()  # the caches
    return runner.prepare([PassPlan(row[cut:cut + block], cut, True, seq, False, (cut, cut + block))
                           for row in tokens], slots).run


def run(model: DiffusionLM, backends: list[str], batches: list[int], seqs: list[int],
        block: int | None, warmup: int, reps: int, seed: int) -> tuple[list[StepRow], list[BackendCheck]]:
    """Dense first (the baseline), then each backend swapped in: check its logits, then time every shape."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    timer = time_cuda if device.type == "cuda" else time_cpu
    shapes = [(b, s, None) for b in batches for s in seqs]
    shapes += [(b, s, block) for b in batches for s in seqs if block and s > block]
    probe = _tokens(model.config, 1, min(seqs), device, seed)
    rows: list[StepRow] = []
    checks: list[BackendCheck] = []
    dense_ms: dict[tuple[int, int, int | None], float] = {}
    progress = tqdm(total=len(shapes) * (1 + len(backends)), desc="steps", unit="shape", file=sys.stderr)

    def time_shapes(label: str) -> None:
        for shape in shapes:
            row = StepRow(label, *shape)
            step = _step(model, _tokens(model.config, row.batch, row.seq, device, seed), row.block)
            row.launches = count_launches(step, device)
            row.ms = timer(step, warmup, reps) * 1e3
            row.positions_per_s = row.rows / row.ms * 1e3
            row.speedup = dense_ms.setdefault(shape, row.ms) / row.ms
            rows.append(row)
            progress.update()

    with torch.inference_mode():
        reference = model(probe).logits
        time_shapes(BASELINE)
        for backend in backends:
            base, modifiers = split_label(backend)
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
            try:
                with fused(model) if FUSED in modifiers else contextlib.nullcontext(), \
                        compiled_elementwise() if COMPILED in modifiers else contextlib.nullcontext(), \
                        swapped(model, base) if base is not None else contextlib.nullcontext():
                    held = torch.cuda.memory_allocated(device) - before if before is not None else None
                    checks.append(BackendCheck(backend, relative_error(model(probe).logits, reference), held))
                    time_shapes(backend)
            except BackendUnavailable as error:
                checks.append(BackendCheck(backend, skipped=str(error)))
                rows.extend(StepRow(backend, *shape, skipped=str(error)) for shape in shapes)
                progress.update(len(shapes))
    progress.close()
    return rows, checks


def markdown(rows: list[StepRow], checks: list[BackendCheck], dense_bytes: int) -> str:
    lines = ["| backend | step | batch | seq | M (rows per linear) | ms / step | positions / s | speedup vs dense "
             "| launches / step |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        timing = (f"skipped: {r.skipped} | | | " if r.skipped else
                  f"{r.ms:.3f} | {r.positions_per_s:,.0f} | {r.speedup:.2f}x | {r.launches}")
        lines.append(f"| {r.backend} | {r.kind} | {r.batch} | {r.seq} | {r.rows} | {timing} |")
    lines += ["", "| backend | max rel. logits error vs dense | swapped layers' memory / dense weights |",
              "| --- | ---: | ---: |"]
    for c in checks:
        memory = "" if c.layer_bytes is None else f"{c.layer_bytes / dense_bytes:.2f}"
        error = f"skipped: {c.skipped}" if c.skipped else f"{c.max_rel_err:.1e}"
        lines.append(f"| {c.backend} | {error} | {memory} |")
    return "\n".join(lines)


def plot(rows: list[StepRow], path: Path, title: str) -> None:
    """Speedup over dense against M, one line per backend, kind of step and sequence length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    timed = [r for r in rows if r.speedup is not None and r.backend != BASELINE]
    for backend, kind, seq in sorted({(r.backend, r.kind, r.seq) for r in timed}):
        points = sorted((r.rows, r.speedup) for r in timed if (r.backend, r.kind, r.seq) == (backend, kind, seq))
        ax.plot(*zip(*points), marker="o" if kind == "full" else "s", linestyle="-" if kind == "full" else "--",
                label=f"{backend}, {kind}, seq {seq}")
    ax.axhline(1.0, color="grey", linewidth=0.8, label="dense (nn.Linear)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set(xlabel="M (rows per linear)", ylabel="step speedup over dense", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive integers, e.g. 1,4,16")
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be at least 1")
    return values


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded",
                        help=f"{' / '.join(PRESETS)} (random weights of the public shapes), 'embedded', or a "
                             "local model directory")
    parser.add_argument("--layers", type=int, default=None, help="keep the first N blocks (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--backends", type=lambda s: s.split(","), default=None,
                        help=f"comma-separated among {', '.join(BACKENDS + (AUTO,))} (auto: the dispatch plan), "
                             f"{FUSED} (nn.Linear, q/k/v and gate/up fused), {COMPILED} (elementwise chains "
                             f"compiled), and a backend with +{FUSED} and/or +{COMPILED}; default: every CUDA "
                             f"backend, auto, {FUSED}, {FUSED}+{COMPILED}, auto+{FUSED} and auto+{FUSED}+{COMPILED} "
                             f"on CUDA, dense and {FUSED} on CPU")
    parser.add_argument("--batch", type=_ints, default=None, help="default: 1,4,16 on CUDA, 1,2 on CPU")
    parser.add_argument("--seq", type=_ints, default=None, help="default: 32,256,1024 on CUDA, 16,64 on CPU")
    parser.add_argument("--block", type=int, default=None,
                        help="also time dual-cached steps over a block of this many positions (0: none; "
                             "default 32 on CUDA, 8 on CPU)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_step.json"))
    parser.add_argument("--plot", type=Path, default=None, help="PNG of speedup against M (default: next to --out)")
    args = parser.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    for label in args.backends or []:
        try:
            split_label(label)
        except ValueError as error:
            parser.error(f"--backends: {error}")
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be at least 1")
    if args.block is not None and args.block < 0:
        parser.error("--block must be 0 (no cached steps) or positive")
    if cuda and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here")
    args.dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    args.backends = args.backends or (["triton", "cusparselt", "cutlass", AUTO, FUSED, f"{FUSED}+{COMPILED}",
                                       f"{AUTO}+{FUSED}", f"{AUTO}+{FUSED}+{COMPILED}"] if cuda
                                      else ["dense", FUSED])
    args.batch = args.batch or ([1, 4, 16] if cuda else [1, 2])
    args.seq = args.seq or ([32, 256, 1024] if cuda else [16, 64])
    args.block = (32 if cuda else 8) if args.block is None else args.block
    args.plot = args.plot or args.out.with_suffix(".png")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    device = torch.device(args.device)
    model = build(args.model, args.layers, device, args.dtype, args.seed)
    names = prune_24(model)
    dense_bytes = sum(model.get_submodule(n).weight.nbytes for n in names)
    rows, checks = run(model, args.backends, args.batch, args.seq, args.block, args.warmup, args.reps, args.seed)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = {"device": device_name, "model": args.model, "layers": len(model.blocks),
              "dtype": str(args.dtype).removeprefix("torch."), "torch": torch.__version__,
              "sparse_layers": len(names), "dense_linear_bytes": dense_bytes,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python -m benchmarks.bench_step", *(sys.argv[1:] if argv is None else argv)]),
              "rows": [asdict(r) for r in rows], "checks": [asdict(c) for c in checks]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(rows, args.plot, f"{args.model} ({len(model.blocks)} blocks), {report['dtype']}, {device_name}")
    print(markdown(rows, checks, dense_bytes))
    print(f"\nwrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
