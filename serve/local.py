"""Running the app on this machine: Ray started in-process, Serve's HTTP and Ray's
metrics export on known ports. Used by the demo, the end-to-end tests and
`python -m serve.local`.

Loopback by default: Ray's node address (hence GCS, raylet, object manager, agents,
metrics export) and the HTTP proxy bind to 127.0.0.1, so nobody else on the network
can reach the API or join the cluster (Ray auth is off here). `--host 0.0.0.0`
exposes the HTTP API only when asked. Ray's temp dir is made under `RAY_TMPDIR` (or
the system's temp dir) and removed on exit, with every process still running from it.
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

LOOPBACK = "127.0.0.1"

# Small or busy machines start Serve's proxy slowly; Ray's 5 s readiness check would kill it.
SLOW_MACHINE_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
    "RAY_USAGE_STATS_ENABLED": "0",
}
# Ray's single-machine mode: the node address is loopback, so its servers bind 127.0.0.1 only.
# (Without it, ray.init turns a 127.0.0.1 node address into the host's network address.)
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
LOOPBACK_RUNTIME_ENV = {"worker_process_setup_hook": "serve.local.bind_serve_replicas_to_loopback"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bind_serve_replicas_to_loopback() -> None:
    """Ray worker setup hook: Serve replicas open their inter-deployment gRPC port on `[::]`
    (hard-coded in ray/serve/_private/replica.py, Ray 2.60) whatever the node address; this
    binds it to loopback like the rest of a single-machine Ray. tests/test_serve_security.py
    fails if any port of ours listens beyond loopback, so a Ray upgrade cannot undo it silently."""
    from ray.serve._private import replica

    bind = replica.add_port_to_grpc_server
    if getattr(bind, "loopback", False):
        return

    def on_loopback(server, address: str):
        host, _, port = address.rpartition(":")
        return bind(server, f"{LOOPBACK}:{port}" if host in ("[::]", "0.0.0.0", "") else address)

    on_loopback.loopback = True
    replica.add_port_to_grpc_server = on_loopback


def ray_temp_dir(parent: str | None = None) -> Path:
    """A new, short directory for Ray's session files (Ray's socket paths must stay short)."""
    base = parent or os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
    Path(base).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="sinkserve-", dir=base))


def processes_using(directory: Path) -> list[int]:
    """PIDs (other than ours) whose command line names `directory`: Ray's GCS and raylet of that
    session (workers rename themselves, so see also `descendants`)."""
    needle, pids = str(directory), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def descendants(pid: int) -> list[int]:
    """Every process started by `pid`, directly or not (Ray's node processes and their workers)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(proc.name))
    found, queue = [], list(children.get(pid, []))
    while queue:
        child = queue.pop()
        found.append(child)
        queue.extend(children.get(child, []))
    return found


def stop_processes(pids: list[int], grace_s: float = 5.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
            time.sleep(0.1)
        pids = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
        if not pids:
            return


@contextmanager
def local_app(app_args: dict, http_port: int | None = None, metrics_port: int | None = None,
              temp_dir: str | None = None, num_cpus: int = 2, ready_timeout_s: float = 600.0,
              host: str = LOOPBACK, stop_on_sigterm: bool = False):
    """Start Ray + the app; yields (base_url, metrics_url); on exit shuts everything down, stops
    any Ray process left from this session and removes the temp dir it made.

    `temp_dir`, when given, is the parent of the session's own new directory. `stop_on_sigterm`
    (for a program's main): SIGTERM unwinds like Ctrl-C, so all of this cleanup runs. It is set
    after ray.init, which installs its own handler that ends the process on the spot."""
    for key, value in SLOW_MACHINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.update(LOOPBACK_ENV)
    import ray
    from ray import serve
    from ray._private import ray_constants

    from serve.app import build_app
    from serve.api.guards import PROXY_ENV

    for key, value in PROXY_ENV.items():  # the proxy's header deadline: read when Ray starts the proxy
        os.environ.setdefault(key, value)
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import: ray may have been imported before the env was set
    http_port = http_port or free_port()
    metrics_port = metrics_port or free_port()
    session_dir = ray_temp_dir(temp_dir)
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _metrics_export_port=metrics_port,
                 _temp_dir=str(session_dir), _node_ip_address=LOOPBACK, configure_logging=False,
                 log_to_driver=False, runtime_env=LOOPBACK_RUNTIME_ENV if host == LOOPBACK else None)
        if stop_on_sigterm:
            signal.signal(signal.SIGTERM, _interrupt)
        started: list[int] = []
        try:
            serve.start(http_options={"host": host, "port": http_port})
            serve.run(build_app(app_args), name="sinkserve", route_prefix="/")
            base_url = f"http://{LOOPBACK}:{http_port}"
            wait_healthy(base_url, ready_timeout_s)
            yield base_url, f"http://{LOOPBACK}:{metrics_port}/metrics"
        finally:
            started = descendants(os.getpid())  # before shutdown: afterwards, lingering agents are orphans
            serve.shutdown()
            ray.shutdown()
    finally:
        stop_processes(sorted(set(started) | set(processes_using(session_dir))))
        shutil.rmtree(session_dir, ignore_errors=True)


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


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


ROUTER_KEYS = ("weights", "sticky", "shadow", "quality", "cost", "canary")


def read_router_config(path: str) -> dict:
    """The router part of the app's arguments from a YAML (or JSON) file; ValueError naming the problem."""
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, RecursionError, yaml.YAMLError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(err, "problem", None) or (str(err).splitlines() or [type(err).__name__])[0]
        raise ValueError(f"--router-config {path}: cannot be read as YAML{where}: {what}") from None
    if not isinstance(config, dict):
        raise ValueError(f"--router-config {path}: must be a mapping of {', '.join(ROUTER_KEYS)}")
    unknown = sorted(set(map(str, config)) - set(ROUTER_KEYS))
    if unknown:
        raise ValueError(f"--router-config {path}: unknown keys {unknown}; allowed: {', '.join(ROUTER_KEYS)}")
    bad = _non_finite(config)
    if bad:
        raise ValueError(f"--router-config {path} {bad[0]}: {bad[1]} is not a finite number")
    weights = config.get("weights")
    if isinstance(weights, dict):
        for name, weight in weights.items():
            if isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight < 0:
                raise ValueError(f"--router-config {path} weights.{name}: {weight} is negative; weights are >= 0")
        numbers = [w for w in weights.values() if isinstance(w, (int, float)) and not isinstance(w, bool)]
        if numbers and len(numbers) == len(weights) and not any(numbers):
            raise ValueError(f"--router-config {path} weights: all are 0, so no variant would get traffic")
    return config


def _non_finite(node, where: str = "") -> tuple[str, float] | None:
    """(dotted key, value) of the first NaN or infinite number in a parsed YAML document, or None."""
    if isinstance(node, float) and not math.isfinite(node):
        return where or "(top level)", node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        found = _non_finite(value, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def build_parser():
    from serve.api.schemas import MAX_TOKENS_LIMIT
    from serve.api.guards import DEFAULT_BODY_TIMEOUT_S
    from sinkprune.cli_args import Parser, add_version_flag, existing_file, integer, nonempty_path, number, port_number

    parser = Parser(prog="python -m serve.local",
                    description="serve a dense and a pruned variant locally until Ctrl-C or SIGTERM")
    add_version_flag(parser)
    parser.add_argument("--model", default="embedded", type=nonempty_path)
    parser.add_argument("--pruned", default=None, type=nonempty_path, help="a pruned artifact directory")
    parser.add_argument("--port", type=port_number, default=8000)
    parser.add_argument("--metrics-port", type=port_number, default=8080, help="must differ from --port")
    parser.add_argument("--max-tokens", type=integer(1, MAX_TOKENS_LIMIT), default=None,
                        help="largest max_tokens a request may ask (default: what the models' sequence length allows "
                        "after a one-token prompt)")
    parser.add_argument("--body-timeout-s", type=number(0, 3600, lo_open=True), default=None,
                        help=f"a request's body must arrive within this many seconds, else 408 (default: "
                        f"{DEFAULT_BODY_TIMEOUT_S:g})")
    parser.add_argument("--max-body-bytes", type=integer(1024, 1 << 30), default=None,
                        help="request bodies over it get 413 (default: 1 MiB)")
    parser.add_argument("--host", default=LOOPBACK, type=nonempty_path,
                        help="HTTP bind address; 0.0.0.0 exposes the API to the network (Ray itself stays on loopback)")
    parser.add_argument("--router-config", type=existing_file, default=None,
                        help="YAML or JSON of the router's decisions: weights (>= 0), sticky, shadow, quality, cost, "
                        "canary (docs/ROLLOUT.md)")
    return parser


def main() -> None:
    from pydantic import ValidationError

    from serve.app import AppArgs
    from serve.decisions.router_config import RouterSettings
    from sinkprune.cli_args import error_line
    from sinkprune.dlm.loading import ModelLoadError, read_config, resolve_model_dir

    parser = build_parser()
    args = parser.parse_args()
    if args.port == args.metrics_port:
        raise SystemExit(error_line(parser.prog, f"--port {args.port} and --metrics-port {args.metrics_port} are the "
                                                 "same port: the API and the metrics need one each"))
    try:
        for model in filter(None, (args.model, args.pruned)):
            limit = read_config(resolve_model_dir(model)).max_position_embeddings
            if args.max_tokens is not None and args.max_tokens >= limit:
                raise ValueError(f"--max-tokens {args.max_tokens} leaves no room for a prompt in the {limit}-token "
                                 f"maximum sequence length of the model {model!r} (its config.json)")
        router = read_router_config(args.router_config) if args.router_config else {}
    except (ModelLoadError, ValueError) as err:
        raise SystemExit(error_line(parser.prog, str(err))) from None
    app_args = {k: v for k, v in {"model": args.model, "pruned": args.pruned, "max_tokens": args.max_tokens,
                                  "max_body_bytes": args.max_body_bytes,
                                  "body_timeout_s": args.body_timeout_s}.items() if v is not None} | router
    try:  # the app's own argument rules, checked before Ray starts
        config = AppArgs.model_validate(app_args)
        RouterSettings.model_validate(router).check_variants(sorted(config.variants))
    except ValidationError as err:
        problem = err.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        field = f"--router-config {where}" if problem["loc"] and problem["loc"][0] in router \
            else "--" + where.replace("_", "-") if where else "--router-config" if router else "arguments"
        raise SystemExit(error_line(parser.prog, f"{field}: {problem['msg']}")) from None
    except ValueError as err:
        raise SystemExit(error_line(parser.prog, f"--router-config: {err}")) from None
    signal.signal(signal.SIGTERM, _interrupt)  # until ray.init replaces it; local_app sets it again after
    try:
        with local_app(app_args, args.port, args.metrics_port, host=args.host,
                       stop_on_sigterm=True) as (url, metrics):
            print(f"serving on {url} (OpenAPI: {url}/docs); Prometheus metrics on {metrics}; Ctrl-C stops",
                  flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)


if __name__ == "__main__":
    main()
