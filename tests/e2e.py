"""Helpers for the end-to-end tests: model fixtures on disk and a real Prometheus server."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from serve.local import free_port


# A plain-text chat format: the embedded model is a base model and ships none; the artifact gets this one so
# that /v1/chat/completions can be served end to end (the dense variant, without it, must refuse chat).
PLAIN_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}assistant:{% endif %}")


def make_dense_and_pruned(root: Path) -> tuple[str, str]:
    """The embedded model and a 2:4 artifact of it (magnitude: no calibration, quick) with a chat template."""
    from sinkprune.artifact import write_artifact
    from sinkprune.dlm.loading import load_model
    from sinkprune.prune import PruneSettings, prune_model

    model, tokenizer = load_model("embedded")
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    prune_model(model, PruneSettings("magnitude", "2:4"))
    pruned = write_artifact(model, root / "pruned", tokenizer, {"method": "magnitude", "pattern": "2:4"})
    return "embedded", str(pruned)


def make_collapsed(root: Path) -> str:
    """A deliberately bad 2:4 artifact: magnitude 2:4 on top of 75% unstructured, whose answers
    the dense model finds far less likely (a paired NLL gap near 1.6 nats/token against 0.1 for
    plain magnitude 2:4, measured on the embedded model)."""
    from sinkprune.artifact import write_artifact
    from sinkprune.dlm.loading import load_model
    from sinkprune.prune import PruneSettings, prune_model

    model, tokenizer = load_model("embedded")
    prune_model(model, PruneSettings("magnitude", "unstructured:0.75"))
    prune_model(model, PruneSettings("magnitude", "2:4"))
    return str(write_artifact(model, root / "collapsed", tokenizer, {"method": "magnitude", "pattern": "2:4"}))


@contextmanager
def prometheus(scrape_url: str, workdir: Path, interval_s: float = 2.0):
    """A real Prometheus (the Debian package) on 127.0.0.1 scraping `scrape_url`; yields a query function.
    The scrape may take the whole interval: Ray's metrics page is large and a busy 2-core machine
    serves it slowly; a scrape that times out would freeze every count the tests compare."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus is not installed (scripts/setup.sh installs the Debian package)")
    target = urllib.parse.urlparse(scrape_url)
    config = workdir / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is valid YAML
        "global": {"scrape_interval": f"{int(interval_s * 1000)}ms", "scrape_timeout": f"{int(interval_s * 1000)}ms",
                   "evaluation_interval": f"{int(interval_s * 1000)}ms"},
        "scrape_configs": [{"job_name": "sinkserve", "metrics_path": target.path,
                            "static_configs": [{"targets": [target.netloc]}]}]}))
    port = free_port()
    process = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                                f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: process.poll() is not None or urllib.request.urlopen(base + "/-/ready", timeout=2).status == 200,
              60, "prometheus ready")
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode} (bad config {config}?)")

        def query(promql: str) -> dict[str, float]:
            url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
            with urllib.request.urlopen(url, timeout=10) as response:
                data = json.loads(response.read())
            return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1]) for r in data["data"]["result"]}

        yield query
    finally:
        process.terminate()
        process.wait(timeout=30)


def _wait(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def wait_until(check, timeout_s: float, what: str):
    """Poll `check()` until it returns a truthy value; returns it."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(1.0)
    raise TimeoutError(f"timed out waiting for {what} (last: {last!r})")
