"""The deploy files: the image, compose, Kubernetes, the Prometheus rules, the dashboard,
the Redis group's scripts, and `gpugate doctor`.

No container engine runs here, so the files are parsed and validated offline against the
schemas their tools use: the compose-spec schema (check-jsonschema's vendored copy), the
Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields fail), KEDA's
ScaledObject (deploy/schemas/, transcribed from its CRD). PromQL is parsed with
promql-parser, and every metric (and label) the alerts and the dashboard query must be one
that a real app's /metrics exports (the app runs in-process on a private redis-server).

The scripts that start the Redis group of compose and Kubernetes (deploy/redis/: a
master, a replica, three Sentinels) run for real, on loopback ports: the group comes up
with the seed as master, a replica is promoted when the master is killed, and the old
master comes back as the new master's replica. `gpugate doctor` is checked on that group
and on a plain redis-server.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import redis as redis_py
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from api.tiers import DEFAULT_TIER, Tier, load_keys_file
from gpugate.doctor import doctor
from shared import keys
from shared.redis.url import parse_sentinel
from shared.settings import Rate, Settings
from tests.processes import ROOT, Process, _spawn, free_port, start_redis, start_sim, wait_until
from tests.sentinel import MASTER_NAME, PASSWORD, SentinelCluster

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
REDIS_SCRIPTS = DEPLOY / "redis"
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
    aliases = {f.alias: name for name, f in Settings.model_fields.items() if f.alias}
    fields = {
        aliases.get(name, name.removeprefix("GPUGATE_").lower()): value
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
    return set(selected_labels(expr))


def selected_labels(expr: str) -> dict[str, set[str]]:
    """Metric name -> the label names its selectors match on, in a PromQL expression."""
    selected: dict[str, set[str]] = {}

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"select metrics by name, not by matcher only: {expr}"
            matchers = {m.name for m in node.matchers.matchers} - {"__name__"}
            selected.setdefault(node.name, set()).update(matchers)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return selected


def grouping_labels(expr: str) -> set[str]:
    """The label names of every `by (...)` in a PromQL expression."""
    labels: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            if str(node.modifier.type).lower().endswith("by"):
                labels.update(node.modifier.labels)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return labels


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname and parts.port, url
    return parts.hostname, parts.port


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
    sims = [s for s in compose()["services"].values() if s.get("command", [""])[0] == "sim"]
    assert len(sims) == 2
    for sim in sims:
        for option in sim["command"][1:]:
            if option.startswith("--"):
                assert option in sim_help


# --- docker compose ---------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec() -> None:
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendored.joinpath("compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


REDIS_NODES = ("redis", "redis-replica")
SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")


def compose_address(service: dict[str, Any]) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(service["networks"]["gpugate"]["ipv4_address"])


def test_compose_redis_persists_jobs_and_never_evicts() -> None:
    services = compose()["services"]
    volumes = set()
    for name in REDIS_NODES:
        node = services[name]
        command = " ".join(node["command"])
        assert "--appendonly yes" in command
        assert "--appendfsync everysec" in command
        assert "--maxmemory-policy noeviction" in command
        data = [v for v in node["volumes"] if v.endswith(":/data")]
        assert len(data) == 1
        volumes.add(data[0])
        assert node["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert len(volumes) == len(REDIS_NODES), "each node has a volume of its own"


def test_compose_runs_redis_as_a_master_a_replica_and_three_sentinels() -> None:
    services = compose()["services"]
    ipam = compose()["networks"]["gpugate"]["ipam"]["config"][0]
    subnet, dynamic = ipaddress.ip_network(ipam["subnet"]), ipaddress.ip_network(ipam["ip_range"])
    fixed = [compose_address(services[name]) for name in (*REDIS_NODES, *SENTINELS, "lb")]
    assert len(set(fixed)) == len(fixed)
    # Known by fixed addresses Docker hands to no other container (a stopped container's
    # DNS name stops resolving, which would stall a failover).
    assert all(a in subnet and a not in dynamic for a in fixed)

    def mounts_script(service: dict[str, Any], script: str) -> None:
        assert service["image"].startswith("redis:7")
        assert service["entrypoint"][0] == "sh"
        path = Path(service["entrypoint"][1])
        mount = next(v for v in service["volumes"] if v.endswith(":" + str(path.parent) + ":ro"))
        assert (DEPLOY / mount.split(":")[0] / path.name) == REDIS_SCRIPTS / script
        assert (REDIS_SCRIPTS / script).is_file()

    group = services["redis"]["environment"]
    seed = f"{compose_address(services['redis'])}:6379"
    sentinels = [f"{compose_address(services[name])}:26379" for name in SENTINELS]
    for name in REDIS_NODES:
        env = services[name]["environment"]
        mounts_script(services[name], "redis-node.sh")
        assert env["REDIS_ANNOUNCE_HOST"] == str(compose_address(services[name]))
        assert env["REDIS_SEED_MASTER"] == seed
        assert env["REDIS_SENTINELS"].split() == sentinels
        for sentinel in SENTINELS:  # asked at start: started first
            assert services[name]["depends_on"][sentinel]["condition"] == "service_started"
    for name in SENTINELS:
        env = services[name]["environment"]
        mounts_script(services[name], "sentinel.sh")
        assert env["SENTINEL_ANNOUNCE_HOST"] == str(compose_address(services[name]))
        assert env["REDIS_SEED_MASTER"] == seed and env["REDIS_SENTINELS"].split() == sentinels
        assert env["REDIS_MASTER_SET"] == group["REDIS_MASTER_SET"]
        # A majority of the three, so one may be lost and two still agree.
        assert int(env["SENTINEL_QUORUM"]) == 2
        # Sentinel rewrites its config as it learns: it lives on a volume of its own.
        conf_dir = str(Path(env["SENTINEL_CONF"]).parent)
        assert any(v.endswith(":" + conf_dir) for v in services[name]["volumes"])
        assert "depends_on" not in services[name]

    for name in ("api", "worker"):
        service = services[name]
        settings = settings_from_env(service["environment"])
        target = parse_sentinel(settings.redis_url)
        assert target is not None, f"{name}: GPUGATE_REDIS_URL is not a redis+sentinel:// URL"
        assert target.master_name == group["REDIS_MASTER_SET"]
        assert {host for host, _ in target.sentinels} == set(SENTINELS)
        assert {port for _, port in target.sentinels} == {26379}
        assert settings.redis_min_replicas == 1
        for dependency in ("redis", *SENTINELS):
            assert service["depends_on"][dependency]["condition"] == "service_healthy"


def network_aliases(service: dict[str, Any]) -> list[str]:
    networks = service.get("networks", [])
    if isinstance(networks, list):
        return []
    return list((networks.get("gpugate") or {}).get("aliases", []))


def test_compose_runs_one_ollama_per_gpu_or_a_simulator_for_each_backend() -> None:
    services = compose()["services"]
    worker = services["worker"]
    backends = settings_from_env(worker["environment"]).backends
    assert [b.name for b in backends] == ["gpu-a", "gpu-b"]
    gpus, volumes = [], []
    for backend in backends:
        host, port = host_port(backend.url)
        assert port == 11434
        ollama = services[host]
        assert ollama["image"].startswith("ollama/ollama") and ollama["profiles"] == ["gpu"]
        (device,) = ollama["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert "count" not in device and len(device["device_ids"]) == 1, "one GPU each"
        gpus.append(device["device_ids"][0])
        # The container sees its one GPU as device 0: a host index here would hide it.
        assert "CUDA_VISIBLE_DEVICES" not in ollama["environment"]
        volumes += [v for v in ollama["volumes"] if v.endswith(":/root/.ollama")]
        # Its cap never above what Ollama runs at once.
        assert backend.gpu_concurrency <= int(ollama["environment"]["OLLAMA_NUM_PARALLEL"])
        (sim_name,) = [n for n, s in services.items() if host in network_aliases(s)]
        sim = services[sim_name]
        assert sim["profiles"] == ["sim"]
        assert sim["command"][:5] == ["sim", "--host", "0.0.0.0", "--port", "11434"]
        parallel = int(sim["command"][sim["command"].index("--parallel") + 1])
        assert backend.gpu_concurrency <= parallel
        for name in (host, sim_name):
            dependency = worker["depends_on"][name]
            assert dependency == {"condition": "service_healthy", "required": False}
    assert len(set(gpus)) == len(gpus) and len(set(volumes)) == len(volumes)
    assert settings_from_env(services["api"]["environment"]).backends == backends


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
    # Bodies up to GPUGATE_MAX_BODY_BYTES reach gpugate, which answers 413 itself.
    body = re.search(r"client_max_body_size\s+(\d+)m;", nginx)
    assert body and int(body[1]) * 2**20 > settings_from_env(api["environment"]).max_body_bytes
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
    assert trigger["type"] == "redis-sentinel"
    assert trigger["metadata"]["listName"] == keys.QUEUED
    config = k8s_object("ConfigMap", "gpugate-config")["data"]
    target = parse_sentinel(settings_from_env(config).redis_url)
    assert target is not None
    assert trigger["metadata"]["sentinelMaster"] == target.master_name
    # The Sentinels gpugate asks, by their fully qualified names (KEDA's operator runs in
    # its own namespace).
    addresses = config[trigger["metadata"]["addressesFromEnv"]].split(",")
    assert [a.split(".")[0] for a in addresses] == [host for host, _ in target.sentinels]
    assert all(re.fullmatch(r"[\w-]+\.[\w-]+\.svc\.cluster\.local:26379", a) for a in addresses)


def test_k8s_redis_persists_jobs_and_never_evicts() -> None:
    conf = k8s_object("ConfigMap", "gpugate-redis")["data"]["redis.conf"]
    settings = dict(line.split(None, 1) for line in conf.splitlines() if line.strip())
    assert settings["appendonly"] == "yes"
    assert settings["appendfsync"] == "everysec"
    assert settings["maxmemory-policy"] == "noeviction"
    node = k8s_object("StatefulSet", "redis")["spec"]
    container = node["template"]["spec"]["containers"][0]
    assert container["args"] == ["/etc/gpugate-redis/redis.conf"]
    data = next(m for m in container["volumeMounts"] if m["name"] == "data")
    assert data["mountPath"] == settings["dir"]
    assert [t["metadata"]["name"] for t in node["volumeClaimTemplates"]] == ["data"]


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container["env"]}


def k8s_fqdn(value: str) -> str:
    """An env value as the pod sees it (the namespace `ns`, the default cluster domain)."""
    return value.replace("$(POD_NAMESPACE)", "ns").replace("$(CLUSTER_DOMAIN)", "cluster.local")


def test_k8s_redis_is_a_master_a_replica_and_three_sentinels_with_stable_names() -> None:
    config = k8s_object("ConfigMap", "gpugate-redis")["data"]
    for script in ("redis-node.sh", "sentinel.sh"):
        assert config[script] == (REDIS_SCRIPTS / script).read_text(), (
            f"k8s/redis.yaml's {script} is not a copy of deploy/redis/{script}"
        )
    nodes = k8s_object("StatefulSet", "redis")
    sentinels = k8s_object("StatefulSet", "redis-sentinel")
    assert nodes["spec"]["replicas"] >= 2 and sentinels["spec"]["replicas"] == 3
    for sts in (nodes, sentinels):
        # After a failover the master may be any pod: none waits for another to start.
        assert sts["spec"]["podManagementPolicy"] == "Parallel"
        # Every pod has a Service of its own, whose name resolves while the pod is gone.
        for i in range(sts["spec"]["replicas"]):
            pod = f"{sts['metadata']['name']}-{i}"
            service = k8s_object("Service", pod)["spec"]
            assert service["selector"]["statefulset.kubernetes.io/pod-name"] == pod
            assert service["publishNotReadyAddresses"] is True
            assert service.get("clusterIP") != "None"
        spec = sts["spec"]["template"]["spec"]
        script = "redis-node.sh" if sts is nodes else "sentinel.sh"
        container = spec["containers"][0]
        assert container["command"] == ["sh", f"/etc/gpugate-redis/{script}"]
        mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
        assert mount["mountPath"] == "/etc/gpugate-redis"
        volume = next(v for v in spec["volumes"] if v["name"] == "config")
        assert volume["configMap"]["name"] == "gpugate-redis"
        pdb = k8s_object("PodDisruptionBudget", sts["metadata"]["name"])
        assert pdb["spec"]["maxUnavailable"] == 1
        assert pdb["spec"]["selector"]["matchLabels"].items() <= (
            sts["spec"]["template"]["metadata"]["labels"].items()
        )

    node_env = container_env(nodes["spec"]["template"]["spec"]["containers"][0])
    sentinel_container = sentinels["spec"]["template"]["spec"]["containers"][0]
    sentinel_env = container_env(sentinel_container)
    sentinel_names = [f"redis-sentinel-{i}" for i in range(3)]
    for env in (node_env, sentinel_env):
        assert k8s_fqdn(env["REDIS_SEED_MASTER"]) == "redis-0.ns.svc.cluster.local:6379"
        assert [k8s_fqdn(s) for s in env["REDIS_SENTINELS"].split()] == [
            f"{name}.ns.svc.cluster.local:26379" for name in sentinel_names
        ]
        assert env["REDIS_MASTER_SET"] == MASTER_NAME
    assert node_env["REDIS_ANNOUNCE_HOST"] == "$(POD_NAME).$(POD_NAMESPACE).svc.$(CLUSTER_DOMAIN)"
    assert sentinel_env["SENTINEL_ANNOUNCE_HOST"] == node_env["REDIS_ANNOUNCE_HOST"]
    assert sentinel_env["SENTINEL_HOSTNAMES"] == "yes"
    assert int(sentinel_env["SENTINEL_QUORUM"]) == 2
    conf_dir = str(Path(sentinel_env["SENTINEL_CONF"]).parent)
    data = next(m for m in sentinel_container["volumeMounts"] if m["name"] == "data")
    assert data["mountPath"] == conf_dir
    assert [t["metadata"]["name"] for t in sentinels["spec"]["volumeClaimTemplates"]] == ["data"]

    settings = settings_from_env(k8s_object("ConfigMap", "gpugate-config")["data"])
    target = parse_sentinel(settings.redis_url)
    assert target is not None, "GPUGATE_REDIS_URL is not a redis+sentinel:// URL"
    assert target.master_name == MASTER_NAME
    assert list(target.sentinels) == [(name, 26379) for name in sentinel_names]
    assert settings.redis_min_replicas == 1


def test_k8s_runs_one_ollama_with_one_gpu_for_each_backend() -> None:
    settings = settings_from_env(k8s_object("ConfigMap", "gpugate-config")["data"])
    assert [b.name for b in settings.backends] == ["gpu-a", "gpu-b"]
    deployments = [d for _, d in k8s_documents() if d["kind"] == "Deployment"]
    claimed = []
    for backend in settings.backends:
        host, port = host_port(backend.url)
        service = k8s_object("Service", host)["spec"]
        assert [p["port"] for p in service["ports"]] == [port]
        (ollama,) = [
            d
            for d in deployments
            if service["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert ollama["spec"]["replicas"] == 1
        (container,) = ollama["spec"]["template"]["spec"]["containers"]
        assert container["image"].startswith("ollama/ollama")
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert backend.gpu_concurrency <= int(container_env(container)["OLLAMA_NUM_PARALLEL"])
        volume = ollama["spec"]["template"]["spec"]["volumes"][0]
        claimed.append(volume["persistentVolumeClaim"]["claimName"])
        k8s_object("PersistentVolumeClaim", claimed[-1])
    assert len(set(claimed)) == len(claimed), "each backend has its own model volume"


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
        "GpugateBackendDown",
        "GpugateBackendSwappingModels",
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
    # One backend out of dispatch for a while; the rest of the fleet goes on.
    down = rules["GpugateBackendDown"]
    assert metric_names(down["expr"]) == {"gpugate_backend_up"}
    assert re.search(r"==\s*0\s*$", down["expr"].strip())
    assert grouping_labels(down["expr"]) == {"backend"}
    assert duration_s(down["for"]) >= 60
    # A backend loading models often: loads over a window, per backend, above a threshold.
    swapping = rules["GpugateBackendSwappingModels"]
    assert metric_names(swapping["expr"]) == {"gpugate_model_loads_total"}
    assert re.search(r"(increase|rate)\(gpugate_model_loads_total\[\d+m\]\)", swapping["expr"])
    assert "backend" in grouping_labels(swapping["expr"])
    assert re.search(r">\s*\d+(\.\d+)?\s*$", swapping["expr"].strip())
    assert duration_s(swapping["for"]) >= 300
    for rule in (down, swapping):
        assert "{{ $labels.backend }}" in rule["annotations"]["summary"]


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


def test_dashboard_shows_each_backend_model_loads_and_tokens_per_key() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    backend = variables["backend"]
    assert backend["definition"] == "label_values(gpugate_backend_up, backend)"
    assert backend["includeAll"] and backend["multi"]
    (row,) = [p for p in dashboard_panels() if p.get("repeat") == "backend"]
    assert row["type"] == "row" and "$backend" in row["title"]
    # The panels of the repeated row: those below it, up to the next row.
    panels = dashboard()["panels"]
    start = panels.index(row) + 1
    end = next((i for i in range(start, len(panels)) if panels[i]["type"] == "row"), len(panels))
    per_backend = " ".join(t["expr"] for p in panels[start:end] for t in p["targets"])
    for metric in (
        "gpugate_backend_up",
        "gpugate_backend_running",
        "gpugate_backend_gpu_concurrency",
        "gpugate_model_loads_total",
    ):
        assert f'{metric}{{backend="$backend"}}' in per_backend, metric
    exprs = " ".join(dashboard_exprs())
    assert "max by (key, kind) (rate(gpugate_key_tokens_total" in exprs


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
def exported() -> Iterator[dict[str, set[str]]]:
    """Metric name -> label names, as GET /metrics of a real app on a private
    redis-server serves them: two backends, a model loaded, a key's tokens served."""
    redis = start_redis()
    try:
        backends = [
            {"name": name, "url": "http://127.0.0.1:9", "gpu_concurrency": 1}
            for name in ("gpu-a", "gpu-b")
        ]
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None,
            redis_url=redis.url,
            backends_json=json.dumps(backends),
            metrics_token=None,
            admin_key=None,
            keys_file=None,
        )
        with redis_py.Redis.from_url(redis.url) as direct:
            # What the workers record as jobs run (shared/keys.py).
            direct.hset(keys.MODEL_LOADS, "gpu-a|llama3.2", 1)
            direct.hset(keys.USAGE, mapping={"anonymous|input_tokens": 12, "anonymous|requests": 1})
            # A key of /admin/keys with a budget (api/apikeys.py), for its budget gauge.
            direct.zadd(keys.APIKEY_NAMES, {"team-a": 1})
            budget = '{"tokens": 1000, "period": "day"}'
            record = {"name": "team-a", "id": "a1", "digest": "0" * 64, "budget": budget}
            direct.hset(keys.apikey("team-a"), mapping=record)
            direct.incr(keys.APIKEYS_VERSION)
        with TestClient(create_app(settings)) as client:
            assert client.get("/health").status_code == 200  # so requests_total has a sample
            response = client.get("/metrics")
            assert response.status_code == 200, response.text
        labels: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                labels.setdefault(sample.name, set()).update(sample.labels)
        yield labels
    finally:
        redis.stop()


@pytest.fixture(scope="module")
def exported_metrics(exported: dict[str, set[str]]) -> set[str]:
    """Sample names served by GET /metrics of a real app on a private redis-server."""
    return set(exported)


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
        "gpugate_backend_running",
        "gpugate_backend_gpu_concurrency",
        "gpugate_backend_up",
        "gpugate_model_loads_total",
        "gpugate_key_tokens_total",
    }
    for histogram in ("gpugate_queue_wait_seconds", "gpugate_job_duration_seconds"):
        expected |= {f"{histogram}_bucket", f"{histogram}_sum", f"{histogram}_count"}
    assert expected <= exported_metrics, sorted(expected - exported_metrics)


def missing_labels(expr: str, exported: dict[str, set[str]]) -> set[str]:
    """Labels the expression matches on or groups by that its metrics do not carry."""
    selected = selected_labels(expr)
    missing = {label for name, used in selected.items() for label in used - exported[name]}
    carried = set().union(*(exported[name] for name in selected))
    return missing | (grouping_labels(expr) - carried)


def test_every_metric_the_alerts_query_is_exported(exported: dict[str, set[str]]) -> None:
    for rule in alert_rules():
        missing = metric_names(rule["expr"]) - set(exported)
        assert not missing, f"{rule['alert']} queries metrics /metrics lacks: {missing}"
        labels = missing_labels(rule["expr"], exported)
        assert not labels, f"{rule['alert']} uses labels its metrics lack: {labels}"


def test_every_metric_the_dashboard_queries_is_exported(exported: dict[str, set[str]]) -> None:
    queries = [*dashboard_exprs()]
    for variable in dashboard()["templating"]["list"]:
        found = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable.get("definition", ""))
        if found:
            queries.append(f"max by ({found[2]}) ({found[1]})")
    for expr in queries:
        missing = metric_names(expr) - set(exported)
        assert not missing, f"dashboard query {expr!r} needs metrics /metrics lacks: {missing}"
        labels = missing_labels(expr, exported)
        assert not labels, f"dashboard query {expr!r} uses labels its metrics lack: {labels}"


def test_keda_reads_the_backlog_not_arqs_queue() -> None:
    """arq's queue also holds running jobs; gpugate's backlog is what /metrics reports."""
    triggers = k8s_object("ScaledObject", "gpugate-worker")["spec"]["triggers"]
    assert [t["metadata"]["listName"] for t in triggers] == [keys.QUEUED]
    assert keys.ARQ_QUEUE not in {t["metadata"]["listName"] for t in triggers}


# --- the Redis group's scripts, for real -----------------------------------------------


@dataclass
class ScriptedGroup:
    """deploy/redis/*.sh run as compose and Kubernetes run them, on loopback ports: two
    data nodes (the first the seed master) and three Sentinels, with tests/sentinel.py's
    password and master name so that its `SentinelCluster` helpers apply."""

    cluster: SentinelCluster
    node_ports: list[int]
    sentinel_ports: list[int]

    @property
    def env(self) -> dict[str, str]:
        return {
            "REDIS_MASTER_SET": MASTER_NAME,
            "REDIS_SEED_MASTER": f"127.0.0.1:{self.node_ports[0]}",
            "REDIS_SENTINELS": " ".join(f"127.0.0.1:{p}" for p in self.sentinel_ports),
            "REDIS_PASSWORD": PASSWORD,
            "REDIS_SENTINEL_WAIT_S": "3",
        }

    def start_node(self, port: int) -> Process:
        data = self.cluster.directory / f"node-{port}"
        data.mkdir(exist_ok=True)
        # compose's options for the node, on loopback and in a directory of the test's own
        argv = [
            "sh",
            str(REDIS_SCRIPTS / "redis-node.sh"),
            *compose()["services"]["redis"]["command"],
        ]
        argv += ["--bind", "127.0.0.1", "--dir", str(data), "--save", ""]
        env = {**self.env, "REDIS_ANNOUNCE_HOST": "127.0.0.1", "REDIS_PORT": str(port)}
        proc = _spawn(f"redis-node-{port}", argv, env)
        proc.port = port
        self._wait_answers(proc)
        return proc

    def start_sentinel(self, port: int) -> Process:
        env = {
            **self.env,
            "SENTINEL_ANNOUNCE_HOST": "127.0.0.1",
            "SENTINEL_PORT": str(port),
            "SENTINEL_BIND": "127.0.0.1",
            "SENTINEL_CONF": str(self.sentinel_conf(port)),
            "SENTINEL_DOWN_AFTER_MS": "1000",
            "SENTINEL_FAILOVER_TIMEOUT_MS": "5000",
        }
        proc = _spawn(f"sentinel-{port}", ["sh", str(REDIS_SCRIPTS / "sentinel.sh")], env)
        proc.port = port
        self._wait_answers(proc)
        return proc

    def sentinel_conf(self, port: int) -> Path:
        return self.cluster.directory / f"sentinel-{port}" / "sentinel.conf"

    def replace(self, old: Process, new: Process) -> None:
        for group in (self.cluster.servers, self.cluster.sentinels):
            if old in group:
                group[group.index(old)] = new

    @staticmethod
    def _wait_answers(proc: Process) -> None:
        def answers() -> bool:
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited early:\n{proc.log()}")
            with redis_py.Redis(port=proc.port, password=PASSWORD, socket_timeout=0.5) as c:
                return bool(c.ping())

        wait_until(answers, timeout=15, what=f"{proc.name} to answer")


@pytest.fixture(scope="module")
def scripted_group() -> Iterator[ScriptedGroup]:
    for tool in ("redis-server", "redis-cli", "timeout", "awk"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed: run `make test`, which installs it")
    directory = Path(tempfile.mkdtemp(prefix="gpugate-deploy-redis-"))
    group = ScriptedGroup(
        SentinelCluster(directory, [], []),
        [free_port() for _ in range(2)],
        [free_port() for _ in range(3)],
    )
    try:
        # As compose orders them: the Sentinels first, then the nodes, which ask them.
        group.cluster.sentinels += [group.start_sentinel(p) for p in group.sentinel_ports]
        group.cluster.servers += [group.start_node(p) for p in group.node_ports]
        yield group
    finally:
        group.cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


def test_the_scripted_redis_group_starts_with_the_seed_as_master(
    scripted_group: ScriptedGroup,
) -> None:
    cluster = scripted_group.cluster
    seed, replica = scripted_group.node_ports
    assert cluster.wait_healthy(replicas=1) == seed
    with cluster.client(replica) as client:
        assert client.info("replication")["role"] == "slave"
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert client.config_get("appendonly")["appendonly"] == "yes"
    for port in scripted_group.sentinel_ports:
        conf = scripted_group.sentinel_conf(port).read_text()
        assert f"sentinel monitor {MASTER_NAME} 127.0.0.1 " in conf  # Sentinel rewrote it
    assert f"the master is 127.0.0.1:{seed}" in cluster.server(replica).log()


async def test_doctor_shows_the_master_the_sentinels_resolved_and_the_replicas_lag(
    scripted_group: ScriptedGroup, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = scripted_group.cluster
    master = cluster.wait_healthy(replicas=1)
    sims = [start_sim("--tokens", "2", "--token-delay", "0") for _ in range(2)]
    try:
        backends = [
            {"name": name, "url": sim.url, "gpu_concurrency": 1}
            for name, sim in zip(("gpu-a", "gpu-b"), sims, strict=True)
        ]
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None,
            redis_url=cluster.url(db=5),
            backends_json=json.dumps(backends),
            redis_min_replicas=1,
            keys_file=None,
        )
        capsys.readouterr()
        await doctor(settings)
        out = capsys.readouterr().out
    finally:
        for sim in sims:
            sim.stop()
    assert PASSWORD not in out, "the Redis password must be masked"
    report = json.loads(out)
    assert set(report) == {"time", "versions", "settings", "redis", "ollama"}
    assert report["redis"]["redis_version"] and report["redis"]["maxmemory_policy"] == "noeviction"
    assert [b["name"] for b in report["redis"]["backends"]] == ["gpu-a", "gpu-b"]
    replication = report["redis"]["replication"]
    assert replication["via"] == "sentinel"
    assert replication["master"] == f"127.0.0.1:{master}" and replication["role"] == "master"
    assert replication["connected_replicas"] == 1
    (replica,) = replication["replicas"]
    (replica_port,) = set(scripted_group.node_ports) - {master}
    assert replica["address"] == f"127.0.0.1:{replica_port}" and replica["state"] == "online"
    assert replica["lag_bytes"] >= 0 and replica["lag_s"] >= 0
    assert [s["master"] for s in replication["sentinels"]] == [f"127.0.0.1:{master}"] * 3
    assert replication["warnings"] == []
    assert [(b["name"], b["gpu_concurrency"]) for b in report["ollama"]] == [
        ("gpu-a", 1),
        ("gpu-b", 1),
    ]
    for backend in report["ollama"]:
        assert backend["version"] and "llama3.2:latest" in backend["models"], backend


async def test_doctor_on_a_plain_url_shows_the_role_and_warns_of_missing_replicas(
    redis_proc: Process, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        redis_url=redis_proc.url,
        ollama_url="http://127.0.0.1:9",
        redis_min_replicas=1,
        keys_file=None,
    )
    capsys.readouterr()
    await doctor(settings)
    report = json.loads(capsys.readouterr().out)
    replication = report["redis"]["replication"]
    assert replication["via"] == "direct" and "sentinels" not in replication
    assert replication["master"] == f"127.0.0.1:{redis_proc.port}"
    assert replication["role"] == "master" and replication["connected_replicas"] == 0
    (warning,) = replication["warnings"]
    assert "GPUGATE_REDIS_MIN_REPLICAS=1" in warning and "503" in warning
    (backend,) = report["ollama"]
    assert backend["name"] == "default" and "Ollama unreachable" in backend["error"]

    # Nothing answers: the report says so instead of failing.
    dead = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    await doctor(dead)
    report = json.loads(capsys.readouterr().out)
    assert "Redis unreachable" in report["redis"]["error"]
    assert "no master found" in report["redis"]["replication"]["error"]


def test_after_a_failover_the_old_master_comes_back_as_a_replica(
    scripted_group: ScriptedGroup,
) -> None:
    cluster = scripted_group.cluster
    master = cluster.wait_healthy(replicas=1)
    with cluster.client(master, db=6) as client:
        client.set("deploy:acked", "1")
        assert client.wait(1, 1000) == 1  # what a replica acknowledged survives
    old = cluster.server(master)
    os.kill(old.pid, signal.SIGKILL)
    old.popen.wait(timeout=10)
    promoted, _ = cluster.wait_promotion(master)
    # The failover over (every Sentinel names the promoted node, none is failing over):
    # a node back in the middle of it can make the Sentinels abort it and keep the old
    # master (seen once in CI, on a loaded machine). Its one replica is the node killed.
    assert cluster.wait_healthy(replicas=0) == promoted
    # Restarted as compose's restart policy or the kubelet would: the same script, port
    # and data. It asks the Sentinels and follows the promoted node.
    back = scripted_group.start_node(master)
    scripted_group.replace(old, back)
    assert cluster.wait_healthy(replicas=1) == promoted
    assert f"the master is 127.0.0.1:{promoted}" in back.log()
    with cluster.client(promoted, db=6) as client:
        assert client.get("deploy:acked") == b"1"
    with cluster.client(master) as client:
        assert client.info("replication")["role"] == "slave"


def test_a_sentinel_without_its_config_monitors_the_current_master(
    scripted_group: ScriptedGroup,
) -> None:
    cluster = scripted_group.cluster
    master = cluster.wait_healthy(replicas=1)
    old = cluster.sentinels[-1]
    old.stop()
    scripted_group.sentinel_conf(old.port).unlink()
    new = scripted_group.start_sentinel(old.port)
    scripted_group.replace(old, new)
    assert f"monitoring 127.0.0.1:{master} as {MASTER_NAME}" in new.log()
    with cluster.sentinel_client(new) as client:
        reply = client.execute_command("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
    assert int(reply[1]) == master
