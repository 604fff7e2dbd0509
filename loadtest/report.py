"""The A/B report: dense against pruned from one load-test run, side by side.

Capacity (throughput, latency, cost per million output tokens) comes from the
phases that forced each variant at the same concurrency; the routed phase shows
the A/B split; the server's own counts (Prometheus exposition scraped before and
after) are checked against the client's; quality comes from the artifact's
manifest (paired NLL measured at prune time) and, when the router scores answers
online, from the same scrapes, with the canary's decisions and the live cost
(loadtest/online.py).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from loadtest.online import increase, markdown_lines, online_sections, parse_exposition
from serve.decisions.cost import cost_per_million
from sinkprune.cli_args import Parser, add_version_flag, error_line, existing_dir, existing_file, number, output_dir
from sinkprune.safe_output import add_overwrite_flag, check_output, staged_output

PROG = "python -m loadtest.report"

REQUESTS_METRIC = "ray_sinkserve_requests"
ONLINE_KEYS = ("online_quality", "canary", "live_cost")
WRITES = ("report.json", "report.md", "latency_vs_throughput.png")


def server_counts(exposition: str) -> dict[str, dict[str, float]]:
    """`{variant: {status: count}}` from a Prometheus text exposition of the app."""
    counts: dict[str, dict[str, float]] = {}
    totals = increase({}, parse_exposition(exposition), REQUESTS_METRIC + "_total", ("variant", "status"))
    for (variant, status), n in (totals or {}).items():
        counts.setdefault(variant, {})[status] = n
    return counts


def count_delta(before: dict, after: dict) -> dict[str, dict[str, float]]:
    return {v: {s: n - before.get(v, {}).get(s, 0.0) for s, n in statuses.items()} for v, statuses in after.items()}


def build_report(phases: list[dict], manifest: dict | None, server: dict | None, price_per_hour: float,
                 price_unit: str, online: dict | None = None) -> dict:
    """`phases`: loadtest summaries tagged with `variant_forced` (dense / pruned / None for routed);
    `online`: `online_sections` of the scrapes (None: no scrapes)."""
    capacity = {}
    for phase in phases:
        if phase.get("variant_forced"):
            for point in phase["phases"]:
                s = point["summary"]["all"]
                capacity.setdefault(phase["variant_forced"], []).append({
                    "concurrency": point["concurrency"], "request_throughput": s["request_throughput"],
                    "output_throughput": s["output_throughput"], "p50_e2el_ms": s.get("p50_e2el_ms"),
                    "p90_e2el_ms": s.get("p90_e2el_ms"), "p99_e2el_ms": s.get("p99_e2el_ms"),
                    "p50_ttft_ms": s.get("p50_ttft_ms"), "completed": s["completed"], "failed": s["failed"],
                    "cost_per_million_output_tokens": cost_per_million(s["output_throughput"], price_per_hour)})
    best = {v: max(points, key=lambda p: p["output_throughput"]) for v, points in capacity.items()}
    routed = next((p for p in phases if not p.get("variant_forced")), None)
    client = {}
    for phase in phases:
        for point in phase["phases"]:
            for variant, s in point["summary"].items():
                if variant != "all":
                    entry = client.setdefault(variant, {"ok": 0, "failed": 0})
                    entry["ok"] += s["completed"]
                    entry["failed"] += s["failed"]
    report = {"capacity": capacity, "best": best, "price_per_hour": price_per_hour, "price_unit": price_unit,
              "client_counts": client, "server_counts": server,
              "routed_split": {v: s["completed"] for v, s in routed["phases"][0]["summary"].items() if v != "all"}
              if routed else None,
              "quality": (manifest or {}).get("quality"), "pruning": {k: (manifest or {}).get(k) for k in
                                                                      ("method", "pattern", "sparsity")}}
    if "dense" in best and "pruned" in best and best["dense"]["output_throughput"] > 0:
        report["throughput_ratio"] = best["pruned"]["output_throughput"] / best["dense"]["output_throughput"]
    report.update({key: (online or {}).get(key) for key in ONLINE_KEYS})
    if server is not None:
        report["counts_agree"] = all(server.get(v, {}).get("ok", 0.0) == c["ok"] for v, c in client.items())
    return report


def _ms(value: float | None) -> str:
    """A latency cell; runs made with vLLM's --metric-percentiles may lack a percentile."""
    return "-" if value is None else f"{value:.0f}"


def markdown(report: dict) -> str:
    lines = ["| variant | concurrency | req/s | output tok/s | p50 / p90 / p99 latency (ms) | p50 first block (ms) | "
             f"cost per 1M output tokens ({report['price_unit']} at {report['price_per_hour']}/h) |",
             "| --- | --- | --- | --- | --- | --- | --- |"] if report["capacity"] else []
    for variant, points in sorted(report["capacity"].items()):
        for p in points:
            cost = p["cost_per_million_output_tokens"]
            lines.append(f"| {variant} | {p['concurrency']} | {p['request_throughput']:.2f} | {p['output_throughput']:.1f} | "
                         f"{_ms(p['p50_e2el_ms'])} / {_ms(p['p90_e2el_ms'])} / {_ms(p['p99_e2el_ms'])} | "
                         f"{_ms(p['p50_ttft_ms'])} | {'-' if cost is None else f'{cost:.3f}'} |")
    lines.append("")
    if "throughput_ratio" in report:
        lines.append(f"- Pruned / dense output throughput (best point each): **{report['throughput_ratio']:.2f}x**")
    quality = report.get("quality")
    if quality and "pruned" in quality:
        delta = quality["pruned"].get("vs_dense", {})
        lines.append(f"- Quality ({report['pruning']['method']}, {report['pruning']['pattern']}): NLL "
                     f"{quality['dense']['nll']:.3f} -> {quality['pruned']['nll']:.3f} nats/token "
                     f"({delta.get('delta_nll', float('nan')):+.3f} ± {delta.get('delta_nll_stderr', float('nan')):.3f}, "
                     "paired, measured at prune time)")
    if report.get("routed_split"):
        lines.append(f"- A/B router split of the routed phase: {report['routed_split']}")
    if report.get("server_counts") is not None:
        agree = "agree" if report["counts_agree"] else "DISAGREE"
        server_ok = {v: s.get("ok", 0) for v, s in report["server_counts"].items()}
        client_ok = {v: c["ok"] for v, c in report["client_counts"].items()}
        lines.append(f"- Successful requests, server (Prometheus) {server_ok} vs client {client_ok}: {agree}")
    lines.extend(markdown_lines(report))
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path:
    """Latency (p50) against output throughput, one line per variant, points by concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, all_points in sorted(report["capacity"].items()):
        points = [p for p in all_points if p["p50_e2el_ms"] is not None]
        xs = [p["output_throughput"] for p in points]
        ys = [p["p50_e2el_ms"] / 1000 for p in points]
        ax.plot(xs, ys, marker="o", label=variant)
        for p, x, y in zip(points, xs, ys):
            ax.annotate(f"c={p['concurrency']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("output tokens / s")
    ax.set_ylabel("median latency (s)")
    ax.set_title("Latency vs throughput")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_json(path: Path, what: str) -> dict:
    """A JSON file the report needs, or ValueError naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{what}: {path} does not exist") from None
    except (OSError, ValueError, RecursionError) as err:
        raise ValueError(f"{what}: {path} cannot be read as JSON: {err}") from None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_summary(summary, where: str) -> dict:
    """A loadtest summary.json of the shape the report reads, or ValueError naming the file and the problem."""
    if not isinstance(summary, dict) or not isinstance(summary.get("phases"), list) or not summary["phases"]:
        raise ValueError(f"{where}: not a load-test summary (a JSON object with a non-empty list `phases`)")
    for i, point in enumerate(summary["phases"]):
        stats = point.get("summary") if isinstance(point, dict) else None
        if not isinstance(stats, dict) or not isinstance(stats.get("all"), dict):
            raise ValueError(f"{where}: phases[{i}] has no `summary` object with `all`")
        concurrency = point.get("concurrency", "missing")
        if concurrency is not None and not _number(concurrency):
            raise ValueError(f"{where}: phases[{i}].concurrency {concurrency!r} is not a number (or null)")
        for variant, entry in stats.items():
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: phases[{i}].summary.{variant} is not an object")
            for key in ("completed", "failed", "request_throughput", "output_throughput"):
                if not _number(entry.get(key)) or entry[key] < 0:
                    raise ValueError(f"{where}: phases[{i}].summary.{variant}.{key} {entry.get(key)!r} is not a "
                                     "number >= 0")
            for key, value in entry.items():
                if key.endswith("_ms") and value is not None and not _number(value):
                    raise ValueError(f"{where}: phases[{i}].summary.{variant}.{key} {value!r} is not a number")
    return summary


def check_manifest(manifest, where: str) -> dict:
    """The parts of an artifact's sinkprune.json the report reads, or ValueError naming the file."""
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: not a JSON object")
    quality = manifest.get("quality")
    if quality is not None:
        problem = "`quality` is not a map of variants to objects with a numeric `nll`"
        if not isinstance(quality, dict) or not all(isinstance(e, dict) and _number(e.get("nll"))
                                                    for e in quality.values()):
            raise ValueError(f"{where}: {problem}")
        if "pruned" in quality and "dense" not in quality:
            raise ValueError(f"{where}: `quality` has `pruned` without `dense`")
        delta = quality.get("pruned", {}).get("vs_dense", {})
        if not isinstance(delta, dict) or not all(_number(v) for k, v in delta.items() if k.startswith("delta_nll")):
            raise ValueError(f"{where}: `quality.pruned.vs_dense` is not an object of numbers")
    for key in ("method", "pattern"):
        if manifest.get(key) is not None and not isinstance(manifest[key], str):
            raise ValueError(f"{where}: `{key}` is not a string")
    return manifest


def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path}: cannot be read as text: {err}") from None


def load_inputs(args) -> tuple[list[dict], dict | None, dict | None, dict | None]:
    """The load-test runs, the artifact's manifest, the server's counts and its online sections
    named on the command line."""
    phases = []
    for spec in args.run:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise ValueError(f"--run {spec!r} is not VARIANT=DIR (e.g. dense=runs/load_dense)")
        summary = check_summary(read_json(Path(directory) / "summary.json", f"--run {spec}"),
                                f"--run {spec}: {Path(directory) / 'summary.json'}")
        phases.append({**summary, "variant_forced": None if name == "routed" else name})
    manifest = None
    if args.pruned_artifact:
        path = Path(args.pruned_artifact) / "sinkprune.json"
        manifest = check_manifest(read_json(path, "--pruned-artifact"), f"--pruned-artifact {path}")
    server = online = None
    if bool(args.metrics_before) != bool(args.metrics_after):
        raise ValueError("--metrics-before and --metrics-after go together (the report counts what happened between)")
    if args.metrics_before:
        before = _read_text(args.metrics_before, "--metrics-before")
        after = _read_text(args.metrics_after, "--metrics-after")
        try:
            server = count_delta(server_counts(before), server_counts(after))
            online = online_sections(before, after)
        except ValueError as err:  # prometheus_client's parser
            raise ValueError(f"--metrics-before/--metrics-after: not a Prometheus text exposition: {err}") from None
    return phases, manifest, server, online


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description=__doc__.splitlines()[0])
    add_version_flag(parser)
    parser.add_argument("--run", action="append", required=True,
                        help="VARIANT=DIR or routed=DIR: a loadtest --out-dir (VARIANT: the forced variant)")
    parser.add_argument("--pruned-artifact", default=None, type=existing_dir,
                        help="its sinkprune.json gives the quality")
    parser.add_argument("--metrics-before", default=None, type=existing_file)
    parser.add_argument("--metrics-after", default=None, type=existing_file)
    parser.add_argument("--price-per-hour", type=number(0, 1e6), default=1.0)
    parser.add_argument("--price-unit", default="USD per CPU-hour")
    parser.add_argument("--out-dir", default="runs/report", type=output_dir,
                        help="must be new or empty (or --overwrite, over a previous report)")
    add_overwrite_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_output(args.out_dir, args.overwrite, ours=WRITES)
        phases, manifest, server, online = load_inputs(args)
    except (ValueError, OSError) as err:
        return error_line(PROG, str(err))
    report = build_report(phases, manifest, server, args.price_per_hour, args.price_unit, online)
    table = markdown(report)
    with staged_output(args.out_dir, args.overwrite, ours=WRITES) as out:
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "report.md").write_text(table)
        written = ["report.md", "report.json"]
        if report["capacity"]:  # forced runs give the curves; a routed run alone has none to draw
            plot(report, out / "latency_vs_throughput.png")
            written.append("latency_vs_throughput.png")
    print(table)
    print(f"wrote {', '.join(written)} to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
