"""`deploy/`: the Serve config, the KubeRay manifests, Prometheus and Grafana, checked with the
real schemas and tools: Ray Serve's config schema and deployment options, the app's own typed
arguments, promtool (config, rules, rule unit tests), and the list of metrics the server exports.
tests/test_deploy_e2e.py checks the same files against a running app."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SERVE_YAML = DEPLOY / "serve.yaml"
RAYSERVICE = DEPLOY / "kuberay" / "rayservice.yaml"
PODMONITOR = DEPLOY / "kuberay" / "podmonitor.yaml"
PROMETHEUSRULE = DEPLOY / "kuberay" / "prometheusrule.yaml"
MODELS_PVC = DEPLOY / "kuberay" / "models-pvc.yaml"
PROMETHEUS = DEPLOY / "prometheus"
RULES = PROMETHEUS / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "sinkserve.json"
DOCKERFILE = DEPLOY / "Dockerfile"

# What the server exports (serve/metrics.py, with the `ray_` prefix and `_total` that Ray adds).
EXPORTED = {
    "ray_sinkserve_requests_total": "counter",
    "ray_sinkserve_request_latency_seconds": "histogram",
    "ray_sinkserve_time_to_first_block_seconds": "histogram",
    "ray_sinkserve_queue_time_seconds": "histogram",
    "ray_sinkserve_generated_tokens_total": "counter",
    "ray_sinkserve_prompt_tokens_total": "counter",
    "ray_sinkserve_denoising_steps_total": "counter",
    "ray_sinkserve_forward_passes_total": "counter",
    "ray_sinkserve_computed_positions_total": "counter",
    "ray_sinkserve_step_latency_seconds": "histogram",
    "ray_sinkserve_batch_size": "histogram",
    "ray_sinkserve_num_requests_waiting": "gauge",
    "ray_sinkserve_num_requests_running": "gauge",
    "ray_sinkserve_ab_assignments_total": "counter",
    "ray_sinkserve_ab_fallbacks_total": "counter",
    "ray_sinkserve_ab_shadow_requests_total": "counter",
    "ray_sinkserve_ab_retries_total": "counter",
    "ray_sinkserve_ab_variant_down_total": "counter",
    "ray_sinkserve_quality_pairs_total": "counter",
    "ray_sinkserve_quality_nll_gap_nats": "histogram",
    "ray_sinkserve_quality_token_agreement": "histogram",
    "ray_sinkserve_quality_nll_gap_exact_sum_nats_total": "counter",
    "ray_sinkserve_quality_token_agreement_exact_sum_total": "counter",
    "ray_sinkserve_cost_per_million_output_tokens": "gauge",
    "ray_sinkserve_canary_decisions_total": "counter",
    "ray_sinkserve_canary_weight": "gauge",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Series Prometheus makes itself: `up` tells a counter that is new from one Prometheus sees for the first time.
PROMETHEUS_SERIES = {"up"}
# PromQL words that are not metric names (functions and aggregations are recognised by their "(").
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                   "offset", "inf", "nan"}
GPU = "nvidia.com/gpu"


# ---- helpers (also used by test_deploy_e2e.py) ------------------------------------------

def series_names() -> set[str]:
    """Every series name the exported metrics give: histograms as _bucket, _sum and _count."""
    names = set()
    for name, kind in EXPORTED.items():
        names.update(name + suffix for suffix in HISTOGRAM_SUFFIXES) if kind == "histogram" else names.add(name)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (Grafana's $variables removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\$\{?\w+\}?", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.:])[A-Za-z_:][\w:]*", expr):
        word = match.group(0)
        if word.lower() in PROMQL_KEYWORDS or expr[match.end():].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def recording_rules() -> dict[str, str]:
    return {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def dashboard_exprs(rate_interval: str = "1m") -> dict[str, str]:
    """{"<panel title> / <refId>": expr} with Grafana's $__rate_interval replaced."""
    return {f"{panel['title']} / {target['refId']}": target["expr"].replace("$__rate_interval", rate_interval)
            for panel in dashboard_panels() for target in panel["targets"]}


def used_metric_names() -> dict[str, set[str]]:
    """{where: metric names} for every dashboard query and every rule."""
    used = {f"dashboard: {where}": metric_names(expr) for where, expr in dashboard_exprs().items()}
    for rule in rules():
        used[f"rules.yml: {rule.get('record') or rule.get('alert')}"] = metric_names(rule["expr"])
    return used


def serve_config() -> dict:
    return yaml.safe_load(SERVE_YAML.read_text())


def rayservice() -> dict:
    return yaml.safe_load(RAYSERVICE.read_text())


def load_render():
    spec = importlib.util.spec_from_file_location("deploy_render", DEPLOY / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed (scripts/setup.sh installs the Debian prometheus package)")
    return binary


def run_promtool(promtool: str, *args: str) -> str:
    result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def unknown_keys(model: type[BaseModel], data: dict, path: str) -> list[str]:
    """Keys of `data` that `model` does not have, recursively: Ray's schemas ignore them silently."""
    fields = model.model_fields
    known = set(fields) | {field.alias for field in fields.values() if field.alias}
    errors = [f"{path}.{key}" for key in data if key not in known]
    for name, field in fields.items():
        value = data.get(name)
        for sub in _models_in(field.annotation):
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                if isinstance(item, dict):
                    where = f"{path}.{name}" + (f"[{i}]" if isinstance(value, list) else "")
                    errors += unknown_keys(sub, item, where)
    return errors


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def model_replicas(config: dict) -> dict[str, dict]:
    """{variant: its deployment's options in the Serve config}."""
    app = config["applications"][0]
    return {d["name"].removeprefix("ModelReplica-"): d for d in app["deployments"]
            if d["name"].startswith("ModelReplica-")}


def gpu_groups(cluster: dict) -> list[dict]:
    return [group for group in cluster["workerGroupSpecs"]
            if GPU in group["template"]["spec"]["containers"][0]["resources"].get("limits", {})]


def cpu_count(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if str(quantity).endswith("m") else float(quantity)


# ---- the Serve config -------------------------------------------------------------------

def test_serve_config_passes_rays_schema_with_no_unknown_key():
    from ray.serve.schema import ServeDeploySchema

    config = serve_config()
    ServeDeploySchema.model_validate(config)
    assert unknown_keys(ServeDeploySchema, config, "serve.yaml") == []
    [app] = config["applications"]
    assert app["import_path"] == "serve.app:build_app" and app["name"] == "sinkserve"


def test_unknown_key_check_catches_a_typo():
    from ray.serve.schema import ServeDeploySchema

    config = serve_config()
    config["applications"][0]["deployments"][0]["autoscaling_config"]["max_replica"] = 3
    ServeDeploySchema.model_validate(config)  # Ray's schema lets it through...
    assert unknown_keys(ServeDeploySchema, config, "serve.yaml") == [  # ...this check does not
        "serve.yaml.applications[0].deployments[0].autoscaling_config.max_replica"]


def test_app_args_engines_and_routing_validate_with_the_apps_own_types():
    from serve.app import AppArgs
    from serve.engine.config import EngineConfig
    from serve.decisions.router_config import RouterSettings

    app = serve_config()["applications"][0]
    args = AppArgs.model_validate(app["args"])
    assert set(args.variants) == {"dense", "pruned"}
    for variant in args.variants.values():
        EngineConfig(**variant.engine)
    [router] = [d for d in app["deployments"] if d["name"] == "ABRouter"]
    user_config = router["user_config"]
    settings = RouterSettings.model_validate(user_config)  # unknown keys are refused
    settings.check_variants(sorted(args.variants))
    assert settings.weights == {"dense": 0.5, "pruned": 0.5} and settings.sticky


def test_deployment_overrides_name_the_apps_deployments_and_ray_accepts_them():
    from ray.serve._private.build_app import build_app as build_deployments  # what `serve deploy` runs

    from serve.app import AppArgs, build_app

    app = serve_config()["applications"][0]
    built = {d.name: d for d in build_deployments(build_app(app["args"]), name=app["name"]).deployments}
    overrides = {d["name"]: d for d in app["deployments"]}
    assert set(overrides) == set(built), "every deployment of the app is configured, and only those"
    for name, override in overrides.items():
        built[name].options(**{k: v for k, v in override.items() if k != "name"})  # raises on a bad option
    variants = AppArgs.model_validate(app["args"]).variants
    for variant, deployment in model_replicas(serve_config()).items():
        # ray_actor_options in the config replace the app's, so a CUDA variant must ask for its GPU here
        if variants[variant].device.startswith("cuda"):
            assert deployment["ray_actor_options"]["num_gpus"] >= 1, variant
        engine = variants[variant].engine
        assert deployment["max_ongoing_requests"] <= engine["max_num_seqs"] + engine["max_queue"], \
            f"{variant}: Serve would send more requests than the engine holds (it answers 429)"
        assert deployment["autoscaling_config"]["target_ongoing_requests"] <= deployment["max_ongoing_requests"]


# ---- one source of truth ----------------------------------------------------------------

def test_rayservice_serve_config_is_serve_yaml():
    from ray.serve.schema import ServeDeploySchema

    embedded = rayservice()["spec"]["serveConfigV2"]
    assert isinstance(embedded, str), "serveConfigV2 is a YAML string"
    ServeDeploySchema.model_validate(yaml.safe_load(embedded))
    assert yaml.safe_load(embedded) == serve_config(), "run: python deploy/render.py"
    assert embedded == SERVE_YAML.read_text()


def test_prometheusrule_spec_is_rules_yml():
    manifest = yaml.safe_load(PROMETHEUSRULE.read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert manifest["spec"] == yaml.safe_load(RULES.read_text()), "run: python deploy/render.py"


def test_render_check_passes_and_notices_a_divergence(tmp_path):
    result = subprocess.run([sys.executable, str(DEPLOY / "render.py"), "--check"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    render = load_render()
    manifest, source = RAYSERVICE.read_text(), SERVE_YAML.read_text()
    assert render.embed(manifest, "serveConfigV2", source, True) == manifest
    changed = source.replace("weights: {dense: 0.5, pruned: 0.5}", "weights: {dense: 0.9, pruned: 0.1}")
    assert changed != source
    with pytest.raises(ValueError):
        render.check_embedded(manifest, "serveConfigV2", changed, True)
    rendered = render.embed(manifest, "serveConfigV2", changed, True)
    render.check_embedded(rendered, "serveConfigV2", changed, True)
    assert yaml.safe_load(rendered)["spec"]["rayClusterConfig"] == rayservice()["spec"]["rayClusterConfig"]


# ---- KubeRay ----------------------------------------------------------------------------

def test_rayservice_has_gpu_workers_models_volume_and_metrics_port():
    doc = rayservice()
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    cluster = doc["spec"]["rayClusterConfig"]
    groups = gpu_groups(cluster)
    assert groups, "a worker group with nvidia.com/gpu limits"
    for group in groups:
        pod = group["template"]["spec"]
        resources = pod["containers"][0]["resources"]
        assert int(resources["requests"][GPU]) == int(resources["limits"][GPU]) >= 1
        assert any(t["key"] == GPU and t.get("effect") == "NoSchedule" for t in pod["tolerations"])
    for spec in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert spec["rayStartParams"]["metrics-export-port"] == "8080"
        ports = spec["template"]["spec"]["containers"][0]["ports"]
        assert {"name": "metrics", "containerPort": 8080} in ports
    head_ports = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    assert {"name": "serve", "containerPort": 8000} in head_ports

    claim = yaml.safe_load(MODELS_PVC.read_text())["metadata"]["name"]
    models = [v["model"] for v in serve_config()["applications"][0]["args"]["variants"].values()]
    for group in groups:
        pod = group["template"]["spec"]
        [volume] = [v for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim]
        [mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["readOnly"] is True
        for model in models:
            assert model.startswith(mount["mountPath"].rstrip("/") + "/"), f"{model} is not on the model volume"


def test_gpu_worker_group_fits_the_replicas():
    cluster = rayservice()["spec"]["rayClusterConfig"]
    replicas = model_replicas(serve_config())
    assert cluster["enableInTreeAutoscaling"] is True, "Serve autoscaling needs Ray's autoscaler to add pods"
    need_min = sum(d["autoscaling_config"]["min_replicas"] * d["ray_actor_options"]["num_gpus"]
                   for d in replicas.values())
    need_max = sum(d["autoscaling_config"]["max_replicas"] * d["ray_actor_options"]["num_gpus"]
                   for d in replicas.values())
    gpus = {g["groupName"]: int(g["template"]["spec"]["containers"][0]["resources"]["limits"][GPU])
            for g in gpu_groups(cluster)}
    have_min = sum(g["minReplicas"] * gpus[g["groupName"]] for g in gpu_groups(cluster))
    have_max = sum(g["maxReplicas"] * gpus[g["groupName"]] for g in gpu_groups(cluster))
    assert have_min >= need_min and have_max >= need_max, (have_min, need_min, have_max, need_max)
    for group in gpu_groups(cluster):
        cpus = cpu_count(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
        for variant, deployment in replicas.items():
            assert deployment["ray_actor_options"]["num_gpus"] > 0, f"{variant} runs on a GPU"
            per_pod = gpus[group["groupName"]] // deployment["ray_actor_options"]["num_gpus"]
            assert per_pod * deployment["ray_actor_options"]["num_cpus"] <= cpus


def test_podmonitor_selects_the_rayservice_pods_on_the_metrics_port():
    monitor = yaml.safe_load(PODMONITOR.read_text())
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == {
        "ray.io/originated-from-crd": "RayService",
        "ray.io/originated-from-cr-name": rayservice()["metadata"]["name"]}
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_image_ray_version_and_packages_agree():
    dockerfile = DOCKERFILE.read_text()
    [base] = re.findall(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-gpu\s*$", dockerfile, flags=re.MULTILINE)
    cluster = rayservice()["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == base[0], "the image's Ray is the cluster's rayVersion"
    assert int(base[1]) >= 10
    images = {c["image"] for spec in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
              for c in spec["template"]["spec"]["containers"]}
    assert len(images) == 1, "head and workers run the same image"
    [include] = re.findall(r"^\[tool\.setuptools\.packages\.find\]\s*include = \[(.*?)\]",
                           (ROOT / "pyproject.toml").read_text(), flags=re.MULTILINE | re.DOTALL)
    packages = {p.strip().strip('"').rstrip("*") for p in include.split(",")}
    copied = set(re.findall(r"^COPY .* (\w+) \./\1\s*$", dockerfile, flags=re.MULTILINE))
    assert copied == packages
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {f"!{p}" for p in packages} | {"!pyproject.toml", "!README.md"} <= set(ignore)


# ---- Prometheus -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["prometheus-local.yml", "prometheus-cluster.yml"])
def test_prometheus_configs_pass_promtool(promtool, name):
    config = yaml.safe_load((PROMETHEUS / name).read_text())
    assert config["rule_files"] == ["rules.yml"]
    run_promtool(promtool, "check", "config", str(PROMETHEUS / name))


def test_local_prometheus_scrapes_the_local_metrics_port():
    config = yaml.safe_load((PROMETHEUS / "prometheus-local.yml").read_text())
    [job] = config["scrape_configs"]
    assert job["static_configs"] == [{"targets": ["127.0.0.1:8080"]}]  # serve.local --metrics-port 8080


def test_rules_pass_promtool_check_and_unit_tests(promtool):
    assert "SUCCESS" in run_promtool(promtool, "check", "rules", str(RULES))
    run_promtool(promtool, "test", "rules", str(PROMETHEUS / "rules_test.yml"))
    records = recording_rules()
    for needed in ("variant:sinkserve_request_latency_seconds:p95_rate5m", "variant:sinkserve_generated_tokens:rate5m",
                   "variant:sinkserve_requests_failed:ratio_rate5m", "variant:sinkserve_ab_fallbacks:rate5m",
                   "variant:sinkserve_quality_nll_gap:mean_rate5m", "variant:sinkserve_quality_token_agreement:mean_rate5m",
                   "variant:sinkserve_quality_pairs_dropped:ratio_rate5m",
                   "variant:sinkserve_cost_per_million_output_tokens:avg",
                   "sinkserve:cost_per_million_output_tokens:pruned_over_dense"):
        assert needed in records
    assert {r["alert"] for r in rules() if "alert" in r} >= {
        "SinkservePrunedSlowerThanDense", "SinkserveErrorRatioHigh", "SinkservePrunedQualityGap",
        "SinkserveCanaryRolledBack", "SinkserveQualityChecksDropped"}


def test_every_alert_is_unit_tested_firing_and_silent():
    tests = yaml.safe_load((PROMETHEUS / "rules_test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    for alert in (r["alert"] for r in rules() if "alert" in r):
        outcomes = {bool(case["exp_alerts"]) for case in cases if case["alertname"] == alert}
        assert outcomes == {True, False}, f"rules_test.yml: {alert} is not tested both firing and silent"


def test_alerts_on_a_counters_increase_also_count_a_new_series():
    """Ray exports a counter from its first increment on, already at 1, and increase() sees no rise
    in a series' first sample: an alert on `increase(...) > 0` alone misses every first event of a
    router process (a rollout's only rollback, a variant's first outage)."""
    checked = 0
    for rule in rules():
        if "alert" not in rule:
            continue
        for name in set(re.findall(r"\bincrease\((\w+)", rule["expr"])):
            selector = rf"{name}(\{{[^}}]*\}})?"
            assert re.search(rf"{selector}\s+unless\s+{selector}\s+offset", rule["expr"]), \
                f"{rule['alert']}: increase({name}) misses a series that appears at 1"
            assert re.search(r"and on \(instance\) \(up offset", rule["expr"]), \
                f"{rule['alert']}: a counter new to Prometheus (not to its router) is no event"
            checked += 1
    assert checked >= 2


QUALITY_MEANS = {"variant:sinkserve_quality_nll_gap:mean_rate5m": "Quality gap (paired NLL, nats/token)",
                 "variant:sinkserve_quality_token_agreement:mean_rate5m": "Token agreement"}


def test_quality_means_come_from_the_exact_counters_never_a_histograms_sum():
    """Ray builds a histogram's _sum from bucket midpoints (and a negative gap falls in the first,
    positive, bucket): the means of the quality gap and agreement divide the router's exact sums by
    the histograms' _count, in the rules and on the dashboard alike (rules_test.yml checks the values)."""
    biased = {"ray_sinkserve_quality_nll_gap_nats_sum", "ray_sinkserve_quality_token_agreement_sum"}
    for where, names in used_metric_names().items():
        assert not names & biased, f"{where} reads {sorted(names & biased)}: bucket midpoints, not the exact sums"
    records = recording_rules()
    exact = {"variant:sinkserve_quality_nll_gap:mean_rate5m": "ray_sinkserve_quality_nll_gap_exact_sum_nats_total",
             "variant:sinkserve_quality_token_agreement:mean_rate5m":
                 "ray_sinkserve_quality_token_agreement_exact_sum_total"}
    panels = {panel["title"]: panel for panel in dashboard_panels()}
    for record, title in QUALITY_MEANS.items():
        assert exact[record] in metric_names(records[record]), record
        [mean] = [t["expr"] for t in panels[title]["targets"] if t["legendFormat"].endswith(" mean")]
        # the panel draws what the alert reads (the dashboard must not depend on recorded series)
        assert re.sub(r"\s+", "", mean) == re.sub(r"\s+", "", records[record]), f"{title}: mean is not {record}"
    gap = records["variant:sinkserve_quality_nll_gap:mean_rate5m"]
    for sign in ("positive", "negative"):  # each sign's series may be missing: counted as 0
        assert re.search(rf'sign="{sign}"\}}\[5m\]\)\)\s+or 0 \* ', gap), sign


# ---- Grafana ----------------------------------------------------------------------------

def test_dashboard_is_well_formed():
    board = dashboard()
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    cells = {}
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
    source = {"type": "prometheus", "uid": "${datasource}"}
    for panel in dashboard_panels():
        assert panel["datasource"] == source and panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == source
            for label in re.findall(r"\{\{(\w+)\}\}", target.get("legendFormat", "")):
                assert re.search(rf"\b{label}\b", target["expr"]), f"{panel['title']}: legend {label} is not kept"


def test_dashboard_rows_hold_their_panels():
    """Grafana puts a panel in the row above it: each panel lies between its row and the next."""
    board = dashboard()["panels"]
    rows = [i for i, panel in enumerate(board) if panel["type"] == "row"]
    assert rows[0] == 0 and [board[i]["title"] for i in rows][-1] == "Decision: quality, cost, canary"
    for start, end in zip(rows, rows[1:] + [len(board)]):
        top = board[start]["gridPos"]["y"] + 1
        bottom = board[end]["gridPos"]["y"] if end < len(board) else float("inf")
        for panel in board[start + 1:end]:
            pos = panel["gridPos"]
            assert top <= pos["y"] and pos["y"] + pos["h"] <= bottom, \
                f"{panel['title']} is not inside the row {board[start]['title']}"


def test_dashboard_queries_are_valid_promql(promtool, tmp_path):
    """promtool parses each query (as a recording rule's expression)."""
    records = [{"record": f"dashboard:query:{i}", "expr": expr} for i, expr in enumerate(dashboard_exprs().values())]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    run_promtool(promtool, "check", "rules", str(path))


# ---- metric names -----------------------------------------------------------------------

def test_exported_list_matches_serve_metrics():
    source = (ROOT / "serve" / "metrics.py").read_text()
    declared = {"ray_sinkserve_" + name + ("_total" if kind == "Counter" else ""): kind.lower()
                for kind, name in re.findall(r'\b(Counter|Gauge|Histogram)\(PREFIX \+ "(\w+)"', source)}
    assert declared == EXPORTED


def test_metric_name_extraction():
    assert metric_names('sum by (variant, le) (rate(ray_x_bucket{status=~"a|b"}[$__rate_interval])) '
                        "/ ignoring (variant) group_left sum(rate(ray_y_total[5m])) or 0 * rec:y:z > 1e3") == {
        "ray_x_bucket", "ray_y_total", "rec:y:z"}


def test_dashboard_and_rules_use_only_exported_metrics_and_defined_records():
    exported, records = series_names(), set(recording_rules())
    for where, names in used_metric_names().items():
        assert names - PROMETHEUS_SERIES, f"{where}: reads no metric"
        unknown = {n for n in names if n not in exported and n not in records and n not in PROMETHEUS_SERIES}
        assert not unknown, f"{where} reads {sorted(unknown)}, which the server does not export"
        if where.startswith("dashboard"):  # the dashboard works on any Prometheus scraping Ray, rules or not
            assert not names & records, f"{where} reads a recorded series"
    used = set().union(*used_metric_names().values())
    base = {re.sub(r"_(bucket|sum|count)$", "", n) if n not in EXPORTED else n for n in used}
    assert set(EXPORTED) <= base, f"the dashboard and rules never show {sorted(set(EXPORTED) - base)}"


def test_image_sets_the_proxy_callback_for_the_header_deadline():
    from serve.api.guards import PROXY_ENV

    lines = DOCKERFILE.read_text().splitlines()
    for key, value in PROXY_ENV.items():
        assert f"ENV {key}={value}" in lines
