"""Running the app on this machine: Ray started in-process on loopback, Serve on
127.0.0.1, Ray's metrics exported on a known port. Used by the demo, the
end-to-end tests and `python -m serve.local`."""
from __future__ import annotations

import argparse
import os
import socket
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

# Small or busy machines start Serve's proxy slowly; Ray's 5 s readiness check would kill it.
SLOW_MACHINE_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def local_app(app_args: dict, http_port: int | None = None, metrics_port: int | None = None,
              temp_dir: str | None = None, num_cpus: int = 2, ready_timeout_s: float = 600.0):
    """Start Ray + the app; yields (base_url, metrics_url); shuts everything down on exit."""
    import ray
    from ray import serve

    from serve.app import build_app

    for key, value in SLOW_MACHINE_ENV.items():
        os.environ.setdefault(key, value)
    http_port = http_port or free_port()
    metrics_port = metrics_port or free_port()
    temp_dir = temp_dir or str(Path("/tmp") / f"sinkserve-ray-{os.getpid()}")
    ray.init(num_cpus=num_cpus, include_dashboard=False, _metrics_export_port=metrics_port, _temp_dir=temp_dir,
             configure_logging=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(build_app(app_args), name="sinkserve", route_prefix="/")
        base_url = f"http://127.0.0.1:{http_port}"
        wait_healthy(base_url, ready_timeout_s)
        yield base_url, f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        serve.shutdown()
        ray.shutdown()


def wait_healthy(base_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base_url + "/healthz", timeout=10) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{base_url} did not become healthy in {timeout_s} s")


def main() -> None:
    parser = argparse.ArgumentParser(description="serve a dense and a pruned variant locally until Ctrl-C")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--pruned", default=None, help="a pruned artifact directory")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8080)
    args = parser.parse_args()
    with local_app({"model": args.model, "pruned": args.pruned}, args.port, args.metrics_port) as (url, metrics):
        print(f"serving on {url} (OpenAPI: {url}/docs); Prometheus metrics on {metrics}; Ctrl-C stops")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
