"""The deploy files: the image, compose, Kubernetes, the Prometheus rules, the dashboard.

No container engine runs here, so the files are parsed and validated offline against the
schemas their tools use: the compose-spec schema (check-jsonschema's vendored copy), the
Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields fail), KEDA's
ScaledObject (deploy/schemas/, transcribed from its CRD). PromQL is parsed with
promql-parser, and every metric the alerts and the dashboard query must be one that a
real app's /metrics exports (the app runs in-process on a private redis-server).
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from api.tiers import DEFAULT_TIER, Tier, load_keys_file
from shared import keys
from shared.settings import Rate, Settings
from tests.processes import ROOT, start_redis

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SUBCOMMANDS = {"api", "worker", "sim"}
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())


# --- helpers --------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every manifest in deploy/k8s but the kustomization."""
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    found = [d for _, d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} in deploy/k8s, found {len(found)}"
    return found[0]


_COMPOSE_VAR = re.compile(
    r"\$(?:(?P<dollar>\$)|\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})"
)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation (`${VAR}`, `${VAR:-default}`, `$$`), values only."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(match: re.Match[str]) -> str:
        if match["dollar"]:
            return "$"
        name, op, arg = match["name"], match["op"], match["arg"]
        current = env.get(name)
        if (op in (":-", ":?") and not current) or (op in ("-", "?") and current is None):
            assert op in (":-", "-"), f"compose would require ${name}: {arg}"
            return str(arg)
        return current or ""

    return _COMPOSE_VAR.sub(sub, value)


def compose() -> dict[str, Any]:
    """deploy/docker-compose.yml as Compose sees it with no variables set."""
    raw = load_yaml(DEPLOY / "docker-compose.yml")
    return dict(interpolate(raw, {}))


def settings_from_env(env: dict[str, Any]) -> Settings:
    """Settings from GPUGATE_* variables only (as a container would see them)."""
    fields = {
        name.removeprefix("GPUGATE_").lower(): value
        for name, value in env.items()
        if name.startswith("GPUGATE_")
    }
    unknown = set(fields) - set(Settings.model_fields)
    assert not unknown, f"not gpugate settings: {sorted('GPUGATE_' + f.upper() for f in unknown)}"
    return Settings(_env_file=None, **fields)  # type: ignore[call-arg]


def duration_s(text: str) -> float:
    """A Go/compose/Prometheus duration like `45s`, `1m30s`, `10m`."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (it must parse)."""
    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"select metrics by name, not by matcher only: {expr}"
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def alert_rules() -> list[dict[str, Any]]:
    data = load_yaml(DEPLOY / "prometheus" / "alerts.yml")
    return [rule for group in data["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return dict(json.loads((DEPLOY / "grafana" / "gpugate.json").read_text()))


def dashboard_panels(panels: list[dict[str, Any]] | None = None) -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"] if panels is None else panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def dashboard_exprs() -> list[str]:
    """Every query of the dashboard, Grafana's variables replaced as Grafana would."""
    grafana_vars = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
    exprs = []
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in grafana_vars.items():
                expr = expr.replace(var, value)
            exprs.append(expr)
    return exprs


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


# --- the image --------------------------------------------------------------------------


def test_image_is_multi_stage_slim_python_and_runs_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    froms = [args for ins, args in instructions if ins == "FROM"]
    assert len(froms) >= 2, "a builder stage and a final stage"
    args = dict(
        a.split("=", 1) for ins, a in instructions if ins == "ARG" and "=" in a
    )  # ARG defaults
    final = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], froms[-1])
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", final), final
    users = [a for ins, a in instructions if ins == "USER"]
    assert users, "the image must switch to a non-root user"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert any(ins == "COPY" and "--from=builder" in a for ins, a in instructions)


def test_image_healthcheck_probes_health_with_python() -> None:
    healthchecks = [a for ins, a in dockerfile_instructions() if ins == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    command = healthchecks[0].split("CMD", 1)[1].strip()
    argv = json.loads(command)
    assert argv[0] == "python" and "/health" in argv[-1]
    # The check is valid Python.
    compile(argv[-1], "<healthcheck>", "exec")


def test_image_copies_everything_the_package_build_needs() -> None:
    copied = set()
    for ins, args in dockerfile_instructions():
        if ins == "COPY" and "--from" not in args:
            copied.update(args.split()[:-1])
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= {pattern.rstrip("*") for pattern in packages}
    assert needed <= copied, f"not copied into the builder: {sorted(needed - copied)}"
    # README.md is the top-level README the SPEC requires; `docker build` fails until
    # it exists (pip itself would build without it).
    for source in copied - {"README.md"}:
        assert (ROOT / source).exists(), f"COPY source {source} does not exist"


def test_image_entrypoint_is_the_gpugate_console_script_with_api_by_default() -> None:
    instructions = dict(dockerfile_instructions())
    assert json.loads(instructions["ENTRYPOINT"]) == ["gpugate"]
    assert json.loads(instructions["CMD"]) == ["api"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["gpugate"] == "gpugate.cli:main"


def gpugate_help(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "gpugate", *args, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_gpugate_help_lists_the_commands_the_deploy_files_run() -> None:
    listed = set(re.search(r"\{([\w,]+)\}", gpugate_help())[1].split(","))  # type: ignore[index]
    used = {json.loads(dict(dockerfile_instructions())["CMD"])[0]}
    for service in compose()["services"].values():
        if "build" in service:  # the services that run the gpugate image
            used.add(service["command"][0])
    for _, doc in k8s_documents():
        if doc["kind"] == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                if container["image"].startswith("gpugate"):
                    used.add(container["args"][0])
    assert used == SUBCOMMANDS
    assert used <= listed
    # The simulator parses its own options: the ones compose passes must exist.
    sim_help = gpugate_help("sim")
    for option in compose()["services"]["ollama-sim"]["command"][1:]:
        if option.startswith("--"):
            assert option in sim_help


# --- docker compose ---------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec() -> None:
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendored.joinpath("compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_compose_redis_persists_jobs_and_never_evicts() -> None:
    redis = compose()["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_compose_runs_ollama_on_a_gpu_or_the_simulator_under_one_name() -> None:
    services = compose()["services"]
    ollama, sim = services["ollama"], services["ollama-sim"]
    assert ollama["image"].startswith("ollama/ollama")
    devices = ollama["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert any(v.endswith(":/root/.ollama") for v in ollama["volumes"])
    assert ollama["profiles"] == ["gpu"] and sim["profiles"] == ["sim"]
    assert "ollama" in sim["networks"]["gpugate"]["aliases"]
    assert sim["command"][:5] == ["sim", "--host", "0.0.0.0", "--port", "11434"]
    worker = services["worker"]
    assert settings_from_env(worker["environment"]).ollama_url == "http://ollama:11434"
    for name in ("ollama", "ollama-sim"):
        dependency = worker["depends_on"][name]
        assert dependency == {"condition": "service_healthy", "required": False}


def test_compose_runs_two_api_replicas_behind_the_load_balancer() -> None:
    services = compose()["services"]
    api, lb = services["api"], services["lb"]
    assert api["deploy"]["replicas"] == 2
    assert "ports" not in api, "replicas cannot share a host port: publish the lb only"
    assert "/health" in api["healthcheck"]["test"][-1]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert lb["depends_on"]["api"]["condition"] == "service_healthy"
    nginx = (DEPLOY / "nginx.conf").read_text()
    assert re.search(r"server\s+api:8000\b", nginx)
    assert "proxy_buffering off" in nginx, "streams must be relayed as they come"
    mount = next(v for v in lb["volumes"] if v.startswith("./nginx.conf:"))
    assert (DEPLOY / mount.split(":")[0]).is_file()
    # gpugate believes X-Forwarded-For from the load balancer's address only, and no
    # other container can be given that address.
    lb_address = ipaddress.ip_address(lb["networks"]["gpugate"]["ipv4_address"])
    assert settings_from_env(api["environment"]).trusted_proxies == [f"{lb_address}/32"]
    ipam = compose()["networks"]["gpugate"]["ipam"]["config"][0]
    assert lb_address in ipaddress.ip_network(ipam["subnet"])
    assert lb_address not in ipaddress.ip_network(ipam["ip_range"])


def test_compose_settings_are_gpugate_settings_and_the_worker_outlives_its_grace() -> None:
    services = compose()["services"]
    for name in ("api", "worker"):
        settings_from_env(services[name]["environment"])  # unknown or invalid ones fail
    worker = services["worker"]
    grace = settings_from_env(worker["environment"]).shutdown_grace
    assert duration_s(worker["stop_grace_period"]) > grace
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["healthcheck"] == {"disable": True}


# --- Kubernetes -------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_k8s_manifests_match_the_kubernetes_schemas(version: str) -> None:
    keda_schema = json.loads((DEPLOY / "schemas" / "keda-scaledobject.schema.json").read_text())
    checked = 0
    for name, doc in k8s_documents():
        if doc["apiVersion"].startswith("keda.sh/"):
            jsonschema.Draft202012Validator(keda_schema).validate(doc)
        else:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = "/".join(str(p) for p in exc.absolute_path)
                pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {path}: {exc}")
        assert "namespace" not in doc["metadata"], f"{name}: manifests are namespace-agnostic"
        checked += 1
    assert checked >= 10


def test_kustomization_lists_every_manifest() -> None:
    listed = load_yaml(K8S / "kustomization.yaml")["resources"]
    present = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == present


def test_k8s_api_has_two_replicas_probes_an_hpa_and_a_pdb() -> None:
    api = k8s_object("Deployment", "gpugate-api")
    assert api["spec"]["replicas"] == 2
    container = api["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    hpa = k8s_object("HorizontalPodAutoscaler", "gpugate-api")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "gpugate-api"
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    service = k8s_object("Service", "gpugate-api")
    assert (
        service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    )


def test_k8s_pdbs_select_the_api_and_the_workers() -> None:
    for name in ("gpugate-api", "gpugate-worker"):
        pdb = k8s_object("PodDisruptionBudget", name)
        pod_labels = k8s_object("Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_k8s_containers_have_requests_and_limits() -> None:
    for name, doc in k8s_documents():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                resources_ = container["resources"]
                assert resources_["requests"], f"{name}: {container['name']} has no requests"
                assert resources_["limits"], f"{name}: {container['name']} has no limits"


def test_k8s_settings_are_valid_and_the_worker_outlives_its_shutdown_grace() -> None:
    config = k8s_object("ConfigMap", "gpugate-config")["data"]
    settings = settings_from_env(config)
    worker = k8s_object("Deployment", "gpugate-worker")["spec"]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] > settings.shutdown_grace
    # The secrets are not in the ConfigMap.
    assert not {"GPUGATE_ADMIN_KEY", "GPUGATE_METRICS_TOKEN"} & set(config)


def test_k8s_secret_template_holds_the_secrets_the_api_reads() -> None:
    secret = k8s_object("Secret", "gpugate-secrets")["stringData"]
    api = k8s_object("Deployment", "gpugate-api")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in api["containers"][0]["env"]}
    for name in ("GPUGATE_ADMIN_KEY", "GPUGATE_METRICS_TOKEN"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "gpugate-secrets" and ref["key"] in secret
    volume = next(v for v in api["volumes"] if v["name"] == "keys")
    assert volume["secret"]["items"][0]["key"] == "keys.toml"
    mount = next(m for m in api["containers"][0]["volumeMounts"] if m["name"] == "keys")
    assert env["GPUGATE_KEYS_FILE"]["value"] == mount["mountPath"] + "/keys.toml"


def test_k8s_keys_file_template_is_a_valid_keys_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(k8s_object("Secret", "gpugate-secrets")["stringData"]["keys.toml"])
    default = Tier(DEFAULT_TIER, Rate.parse("60/minute"), 10, 64, 0)
    ring = load_keys_file(path, default)
    assert ring.closed and set(ring.tiers) >= {"free", "pro"}


def test_keda_scales_the_workers_on_gpugates_queue() -> None:
    scaled = k8s_object("ScaledObject", "gpugate-worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == "gpugate-worker"
    k8s_object("Deployment", "gpugate-worker")
    assert scaled["minReplicaCount"] >= 1, "no worker means no admission: never scale to 0"
    trigger = scaled["triggers"][0]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == keys.QUEUED
    config = k8s_object("ConfigMap", "gpugate-config")["data"]
    assert trigger["metadata"]["addressFromEnv"] in config


def test_k8s_redis_persists_jobs_and_never_evicts() -> None:
    conf = k8s_object("ConfigMap", "gpugate-redis")["data"]["redis.conf"]
    settings = dict(line.split(None, 1) for line in conf.splitlines() if line.strip())
    assert settings["appendonly"] == "yes"
    assert settings["appendfsync"] == "everysec"
    assert settings["maxmemory-policy"] == "noeviction"


# --- Prometheus and Grafana -------------------------------------------------------------


def test_alert_rules_have_what_promtool_checks() -> None:
    data = load_yaml(DEPLOY / "prometheus" / "alerts.yml")
    assert set(data) == {"groups"}
    names = set()
    for group in data["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", rule["alert"])
            assert rule["alert"] not in names, f"duplicate alert {rule['alert']}"
            names.add(rule["alert"])
            promql_parser.parse(rule["expr"])
            duration_s(rule["for"])
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert {"summary", "description", "runbook"} <= set(rule["annotations"])
    assert {
        "GpugateQueueFull",
        "GpugateNoLiveWorkers",
        "GpugateOllamaErrorsRising",
        "GpugateGpuSaturated",
    } <= names


def test_alert_runbooks_point_at_sections_of_the_operating_guide() -> None:
    headings = re.findall(r"^#+\s+(.+)$", (DEPLOY / "README.md").read_text(), re.MULTILINE)
    anchors = {github_anchor(h) for h in headings}
    for rule in alert_rules():
        runbook = rule["annotations"]["runbook"]
        assert runbook == f"README.md#alert-{rule['alert'].lower()}"
        assert runbook.split("#")[1] in anchors, f"no section for {runbook}"


@pytest.mark.parametrize("readme", ["README.md", "k8s/README.md"])
def test_readme_links_point_at_files_and_sections_that_exist(readme: str) -> None:
    path = DEPLOY / readme
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{readme}: broken link {target}"
        if anchor:
            headings = re.findall(r"^#+\s+(.+)$", linked.read_text(), re.MULTILINE)
            assert anchor in {github_anchor(h) for h in headings}, f"{readme}: {target}"


def test_alerts_use_the_exact_conditions_asked_for() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert rules["GpugateNoLiveWorkers"]["for"] == "1m"
    assert "== 0" in rules["GpugateNoLiveWorkers"]["expr"]
    assert 'reason="queue_full"' in rules["GpugateQueueFull"]["expr"]
    assert rules["GpugateQueueFull"]["for"] == "5m"
    saturated = rules["GpugateGpuSaturated"]
    assert "deriv(gpugate_queue_depth" in saturated["expr"] and saturated["for"] == "10m"


def test_prometheus_example_loads_the_alert_rules() -> None:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    for rule_file in config["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file()


def test_dashboard_is_a_grafana_dashboard_on_a_prometheus_variable() -> None:
    dash = dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard_panels():
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert target["refId"]
    for expr in dashboard_exprs():
        promql_parser.parse(expr)


def test_dashboard_shows_outcomes_rejections_queue_cap_and_percentiles() -> None:
    exprs = " ".join(dashboard_exprs())
    assert "sum by (status) (rate(gpugate_requests_total" in exprs
    assert "sum by (reason) (rate(gpugate_rejections_total" in exprs
    assert "gpugate_queue_depth" in exprs
    assert "gpugate_running_jobs" in exprs and "gpugate_gpu_concurrency" in exprs
    for histogram in ("gpugate_queue_wait_seconds", "gpugate_job_duration_seconds"):
        for q in ("0.5", "0.95", "0.99"):
            assert f"histogram_quantile({q}, max by (le) (rate({histogram}_bucket" in exprs


# --- every queried metric is exported ---------------------------------------------------


@pytest.fixture(scope="module")
def exported_metrics() -> Iterator[set[str]]:
    """Sample names served by GET /metrics of a real app on a private redis-server."""
    redis = start_redis()
    try:
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None,
            redis_url=redis.url,
            ollama_url="http://127.0.0.1:9",
            metrics_token=None,
            admin_key=None,
            keys_file=None,
        )
        with TestClient(create_app(settings)) as client:
            assert client.get("/health").status_code == 200  # so requests_total has a sample
            response = client.get("/metrics")
            assert response.status_code == 200, response.text
        names = {
            sample.name
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples
        }
        yield names
    finally:
        redis.stop()


def test_metrics_export_what_the_deploy_files_rely_on(exported_metrics: set[str]) -> None:
    expected = {
        "gpugate_requests_total",
        "gpugate_rejections_total",
        "gpugate_jobs_total",
        "gpugate_ollama_errors_total",
        "gpugate_queue_depth",
        "gpugate_running_jobs",
        "gpugate_gpu_concurrency",
        "gpugate_workers_alive",
        "gpugate_estimated_wait_seconds",
        "gpugate_mean_job_seconds",
    }
    for histogram in ("gpugate_queue_wait_seconds", "gpugate_job_duration_seconds"):
        expected |= {f"{histogram}_bucket", f"{histogram}_sum", f"{histogram}_count"}
    assert expected <= exported_metrics, sorted(expected - exported_metrics)


def test_every_metric_the_alerts_query_is_exported(exported_metrics: set[str]) -> None:
    for rule in alert_rules():
        missing = metric_names(rule["expr"]) - exported_metrics
        assert not missing, f"{rule['alert']} queries metrics /metrics lacks: {missing}"


def test_every_metric_the_dashboard_queries_is_exported(exported_metrics: set[str]) -> None:
    for expr in dashboard_exprs():
        missing = metric_names(expr) - exported_metrics
        assert not missing, f"dashboard query {expr!r} needs metrics /metrics lacks: {missing}"


def test_keda_reads_the_backlog_not_arqs_queue() -> None:
    """arq's queue also holds running jobs; gpugate's backlog is what /metrics reports."""
    triggers = k8s_object("ScaledObject", "gpugate-worker")["spec"]["triggers"]
    assert [t["metadata"]["listName"] for t in triggers] == [keys.QUEUED]
    assert keys.ARQ_QUEUE not in {t["metadata"]["listName"] for t in triggers}
