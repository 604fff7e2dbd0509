"""The main job on the embedded default (or a local model and GPU): prune to 2:4 with the
default method (the best of the project's comparison: sink-aware SparseGPT), serve dense and
pruned on Ray Serve behind the A/B router, load-test both and through the router, print the
A/B report. Every stage is a real command (the CLI, the server process, HTTP load);
everything is shut down at the end."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PY = sys.executable


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run(*args: str) -> None:
    subprocess.run([PY, *args], check=True)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}")
        try:
            if urllib.request.urlopen(url + "/healthz", timeout=5).status == 200:
                return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{url} not healthy after {timeout_s} s")


def wait_counts(metrics_url: str, expected_ok: int, timeout_s: float = 90) -> str:
    """Ray exports metrics every few seconds: wait until the server has counted every success."""
    from loadtest.report import server_counts

    deadline = time.monotonic() + timeout_s
    while True:
        text = scrape(metrics_url)
        total = sum(s.get("ok", 0) for s in server_counts(text).values())
        if total >= expected_ok or time.monotonic() > deadline:
            return text
        time.sleep(2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out-dir", default="runs/demo")
    parser.add_argument("--requests", type=int, default=16, help="per load phase")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrencies", default="1,4")
    parser.add_argument("--price-per-hour", type=float, default=0.10, help="price of the machine per hour")
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()

    step("1/4 prune: 2:4 with the defaults (`--method auto`: sink-aware SparseGPT, 128 windows noised at 10 timesteps)")
    pruned = out / "pruned"
    run("-m", "sinkprune", "prune", "--model", args.model, "--pattern", "2:4", "--device", args.device,
        "--out-dir", str(pruned), "--overwrite")  # the demo replaces the stages of its own earlier runs, nothing else

    step("2/4 serve: Ray Serve, dense and pruned replicas behind the A/B router")
    from serve.local import free_port

    port, metrics_port = free_port(), free_port()
    server = subprocess.Popen([PY, "-m", "serve.local", "--model", args.model, "--pruned", str(pruned),
                               "--port", str(port), "--metrics-port", str(metrics_port)],
                              stdout=open(out / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    base, metrics = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        wait_healthy(base, server, 900)
        before = scrape(metrics)
        (out / "metrics_before.txt").write_text(before)

        step("3/4 load: each variant forced, then through the router")
        runs = []
        common = ["--base-url", base, "--num-requests", str(args.requests), "--max-tokens", str(args.max_tokens),
                  "--max-seconds", "300", "--extra", json.dumps({"steps": args.max_tokens})]
        for variant in ("dense", "pruned"):
            run("-m", "loadtest", *common, "--concurrencies", args.concurrencies, "--variant", variant,
                "--out-dir", str(out / f"load_{variant}"), "--overwrite")
            runs += ["--run", f"{variant}={out / f'load_{variant}'}"]
        run("-m", "loadtest", *common, "--concurrencies", "4", "--out-dir", str(out / "load_routed"), "--overwrite")
        runs += ["--run", f"routed={out / 'load_routed'}"]
        sent_ok = sum(json.loads(line)["ok"] for name in ("dense", "pruned", "routed")
                      for line in (out / f"load_{name}" / "records.jsonl").read_text().splitlines())
        (out / "metrics_after.txt").write_text(wait_counts(metrics, sent_ok))

        step("4/4 the A/B report")
        run("-m", "loadtest.report", *runs, "--pruned-artifact", str(pruned),
            "--metrics-before", str(out / "metrics_before.txt"), "--metrics-after", str(out / "metrics_after.txt"),
            "--price-per-hour", str(args.price_per_hour), "--out-dir", str(out / "report"), "--overwrite")
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    print(f"\ndemo finished in {(time.monotonic() - began) / 60:.1f} min; everything is under {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
