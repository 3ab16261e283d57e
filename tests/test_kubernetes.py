"""The Kubernetes manifests (``deploy/kubernetes/``), rendered and checked offline.

Each overlay is rendered with ``kubectl kustomize`` (a missing kubectl skips, and fails under CI),
every object is validated against the Kubernetes API schemas shipped by ``kubernetes-validate``
(strict: unknown fields are errors), and what the objects say is compared with what
``evssm serve`` really does: the settings ConfigMap against the settings model, probes against
the app's routes, mounts against the paths the settings name, the grace period against the drain,
the load balancer's and dashboard's ConfigMaps against the project's files, the autoscaler's
metrics against the Prometheus adapter's rules and the server's metric registry.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import require_tool

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
# Oldest Kubernetes release the manifests target (autoscaling/v2, policy/v1 and the rest are GA).
KUBERNETES_VERSION = "1.29.0"
ADAPTER_VALUES = KUBERNETES / "prometheus-adapter" / "values.yaml"
# Custom resources the API schemas do not cover, and the fields they must have.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"): ("selector", "endpoints")}
# The drain writes every session's snapshot after the in-flight packets are answered: seconds
# allowed for it (docs/deployment.md, "Capacity": 0.5 s for 1,024 sessions measured here).
SNAPSHOT_ALLOWANCE_S = 5


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path:
        return path
    message = "kubectl not found: install a kubectl with kustomize (kubectl kustomize), 1.21 or newer"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must have it)")
    pytest.skip(message)


@functools.cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    """The objects ``kubectl kustomize deploy/kubernetes/overlays/OVERLAY`` prints."""
    result = subprocess.run([kubectl(), "kustomize", str(KUBERNETES / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def one(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    """The object of ``kind`` whose name is ``name`` (generated ConfigMaps: ``name-HASH``)."""
    found = [o for o in objects if o["kind"] == kind and re.fullmatch(
        re.escape(name) + r"(-[a-z0-9]{10})?", o["metadata"]["name"])]
    assert len(found) == 1, f"{kind} {name}: {[o['metadata']['name'] for o in found]}"
    return found[0]


def server_container(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    (container,) = one(objects, "Deployment", "evssm")["spec"]["template"]["spec"]["containers"]
    return container


def server_environment(objects: tuple[dict[str, Any], ...]) -> dict[str, str]:
    """The server container's variables: its ConfigMap's, then its own ``env`` values."""
    container = server_container(objects)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        env.update(next(o for o in objects if o["kind"] == "ConfigMap"
                        and o["metadata"]["name"] == name)["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def settings_of(env: dict[str, str]) -> Any:
    from evssm.server.settings import Settings

    return Settings.from_env(env)


# --- rendering and schemas -----------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_validates(overlay: str) -> None:
    import kubernetes_validate

    objects = rendered(overlay)
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "Deployment", "StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget",
            "HorizontalPodAutoscaler", "ServiceMonitor"} <= kinds, kinds
    for obj in objects:
        where = f"{obj['kind']} {obj['metadata']['name']}"
        custom = CUSTOM_KINDS.get((obj["apiVersion"], obj["kind"]))
        if custom is not None:
            assert all(obj["spec"].get(f) for f in custom), where
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{overlay}: {where}: {e.message} at {list(e.path)}")
        assert obj["kind"] == "Namespace" or obj["metadata"].get("namespace") == "evssm", where


def test_a_broken_object_fails_validation() -> None:
    """The validator is not a no-op: a misspelt field of the server Deployment is refused."""
    import copy

    import kubernetes_validate

    broken = copy.deepcopy(one(rendered("cpu"), "Deployment", "evssm"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# --- the server against evssm serve --------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_are_real_evssm_variables_and_valid(overlay: str) -> None:
    from evssm.server.settings import Settings, env_name

    env = server_environment(rendered(overlay))
    known = {env_name(f) for f in Settings.model_fields}
    unknown = sorted(k for k in env if k.startswith("EVSSM_") and k not in known)
    assert not unknown, f"not settings of evssm serve: {unknown}"
    settings = settings_of(env)  # raises, naming the setting, if a value is invalid
    assert settings.host == "0.0.0.0"
    assert settings.state_store and settings.compilation_cache and settings.api_keys


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_and_probes_are_what_the_server_serves(overlay: str) -> None:
    from evssm.server.app import create_app
    from evssm.server.settings import Settings

    objects = rendered(overlay)
    settings = settings_of(server_environment(objects))
    container = server_container(objects)
    (port,) = container["ports"]
    assert port["containerPort"] == settings.port and port["name"] == "http"
    routes = {r.path for r in create_app(Settings()).routes}
    paths = {name: container[name]["httpGet"]["path"] for name in
             ("startupProbe", "livenessProbe", "readinessProbe")}
    assert paths == {"startupProbe": "/healthz", "livenessProbe": "/healthz",
                     "readinessProbe": "/readyz"}
    assert set(paths.values()) <= routes
    for name in paths:
        assert container[name]["httpGet"]["port"] in ("http", settings.port)
    pod = one(objects, "Deployment", "evssm")["spec"]["template"]["metadata"]
    assert pod["annotations"]["prometheus.io/port"] == str(settings.port)
    assert pod["annotations"]["prometheus.io/path"] in routes
    headless = one(objects, "Service", "evssm-replicas")
    assert headless["spec"]["clusterIP"] == "None"
    assert [p["port"] for p in headless["spec"]["ports"]] == [settings.port]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_paths_the_settings_name_are_mounted(overlay: str) -> None:
    objects = rendered(overlay)
    settings = settings_of(server_environment(objects))
    spec = one(objects, "Deployment", "evssm")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in server_container(objects)["volumeMounts"]}
    # The compilation cache is its own volume.
    assert "emptyDir" in volumes[mounts[settings.compilation_cache]] or \
        "persistentVolumeClaim" in volumes[mounts[settings.compilation_cache]]
    # The key file is the Secret's item, mounted read-only.
    directory, file = os.path.split(settings.api_keys)
    secret = volumes[mounts[directory]]["secret"]
    assert secret["secretName"] == "evssm-api-keys" and file == "keys"
    assert secret["defaultMode"] & 0o007 == 0, "the key file must not be readable by others"
    assert spec["securityContext"]["runAsUser"] == 10001  # the image's user (Dockerfile)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_pre_stop_drain_and_snapshots(overlay: str) -> None:
    objects = rendered(overlay)
    settings = settings_of(server_environment(objects))
    spec = one(objects, "Deployment", "evssm")["spec"]["template"]["spec"]
    command = server_container(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    needed = float(command[1]) + settings.drain_timeout + SNAPSHOT_ALLOWANCE_S
    assert spec["terminationGracePeriodSeconds"] >= needed


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_state_store_is_the_redis_service(overlay: str) -> None:
    from urllib.parse import urlsplit

    objects = rendered(overlay)
    url = urlsplit(settings_of(server_environment(objects)).state_store)
    redis = one(objects, "Service", "evssm-redis")
    assert url.scheme == "redis" and url.hostname == redis["metadata"]["name"]
    assert url.port in [p["port"] for p in redis["spec"]["ports"]]
    (container,) = one(objects, "StatefulSet", "evssm-redis")["spec"]["template"]["spec"]["containers"]
    assert container["ports"][0]["containerPort"] == url.port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_reach_the_server_pods(overlay: str) -> None:
    objects = rendered(overlay)
    deployment = one(objects, "Deployment", "evssm")
    labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str]) -> bool:
        return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

    assert selects(deployment["spec"]["selector"]["matchLabels"])
    assert selects(one(objects, "Service", "evssm-replicas")["spec"]["selector"])
    assert selects(one(objects, "PodDisruptionBudget", "evssm")["spec"]["selector"]["matchLabels"])
    monitor = one(objects, "ServiceMonitor", "evssm")["spec"]
    headless = one(objects, "Service", "evssm-replicas")
    assert all(headless["metadata"]["labels"].get(k) == v
               for k, v in monitor["selector"]["matchLabels"].items())
    assert {e["port"] for e in monitor["endpoints"]} <= {p["name"] for p in headless["spec"]["ports"]}
    # The job name the dashboard's and alerts' queries select (job="evssm" in prometheus.yml).
    jobs = {j["job_name"] for j in yaml.safe_load(
        (ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]}
    assert headless["metadata"]["labels"][monitor["jobLabel"]] in jobs
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0 and strategy["maxSurge"] == 1


# --- load balancer and dashboard: generated from the project's files ----------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_haproxy_runs_the_project_config_against_the_headless_service(overlay: str) -> None:
    objects = rendered(overlay)
    config = one(objects, "ConfigMap", "evssm-haproxy")
    assert config["data"] == {"haproxy.cfg": (ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text()}
    spec = one(objects, "Deployment", "evssm-lb")["spec"]["template"]["spec"]
    assert spec["volumes"][0]["configMap"]["name"] == config["metadata"]["name"]
    (container,) = spec["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    host, port = env["EVSSM_REPLICA_ADDRESS"]["value"].rsplit(":", 1)
    assert host == "evssm-replicas.$(POD_NAMESPACE).svc.cluster.local"
    assert int(port) == settings_of(server_environment(objects)).port
    assert '"${EVSSM_REPLICA_ADDRESS-' in config["data"]["haproxy.cfg"]
    bind = re.search(r"^\s*bind :(\d+)$", config["data"]["haproxy.cfg"], re.M)
    assert bind and {p["containerPort"] for p in container["ports"]} >= {int(bind.group(1))}
    lb = one(objects, "Service", "evssm-lb")
    assert lb["spec"]["ports"][0]["targetPort"] == "http"
    slots = re.search(r"server-template \w+ 1-(\d+) ", config["data"]["haproxy.cfg"])
    assert slots and one(objects, "HorizontalPodAutoscaler", "evssm")["spec"]["maxReplicas"] <= \
        int(slots.group(1)), "more pods than HAProxy has server slots"


def test_haproxy_config_is_valid_with_the_pods_environment(tmp_path: Path) -> None:
    """``haproxy -c`` on the ConfigMap's file with the variables the evssm-lb pod gets."""
    objects = rendered("cpu")
    config = tmp_path / "haproxy.cfg"
    config.write_text(one(objects, "ConfigMap", "evssm-haproxy")["data"]["haproxy.cfg"])
    (container,) = one(objects, "Deployment", "evssm-lb")["spec"]["template"]["spec"]["containers"]
    value = next(e["value"] for e in container["env"] if e["name"] == "EVSSM_REPLICA_ADDRESS")
    env = {**os.environ, "EVSSM_REPLICA_ADDRESS": value.replace("$(POD_NAMESPACE)", "evssm")}
    result = subprocess.run([require_tool("haproxy", "haproxy"), "-c", "-f", str(config)],
                            capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_configmap_is_the_dashboard_file() -> None:
    config = one(rendered("cpu"), "ConfigMap", "evssm-grafana-dashboard")
    text = (ROOT / "deploy" / "grafana" / "dashboards" / "evssm.json").read_text()
    assert config["data"] == {"evssm.json": text}
    assert json.loads(config["data"]["evssm.json"])["uid"]
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"


# --- autoscaling ---------------------------------------------------------------------------------
def adapter_metrics() -> dict[str, str]:
    """Custom metric name -> the series it is computed from, by the adapter's rules."""
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    out = {}
    for rule in rules:
        series = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{", rule["seriesQuery"]).group(1)
        name = re.sub(rule["name"]["matches"], rule["name"]["as"], series)
        assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        out[name] = series
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_metrics_come_from_adapter_rules_over_server_series(overlay: str) -> None:
    from evssm.server.metrics import Metrics

    objects = rendered(overlay)
    hpa = one(objects, "HorizontalPodAutoscaler", "evssm")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "evssm"}
    names = [m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"]
    assert names, "the autoscaler needs per-pod metrics"
    by_rule = adapter_metrics()
    exported = {f.name + ("_total" if f.type == "counter" else "") for f in Metrics().registry.collect()}
    for name in names:
        assert name in by_rule, f"no Prometheus adapter rule makes {name}"
        assert by_rule[name] in exported, f"{by_rule[name]} is not a series of the server"
    sessions = next(m for m in hpa["metrics"] if m["pods"]["metric"]["name"] == "evssm_sessions_active")
    max_sessions = settings_of(server_environment(objects)).max_sessions
    assert 0 < float(sessions["pods"]["target"]["averageValue"]) < max_sessions
    assert one(objects, "Deployment", "evssm")["spec"]["replicas"] >= hpa["minReplicas"]


def test_gpu_overlay_asks_for_a_gpu() -> None:
    objects = rendered("gpu")
    container = server_container(objects)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith(":cuda12")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert settings_of(server_environment(objects)).backend == "xla"
    assert "nvidia.com/gpu" not in str(server_container(rendered("cpu"))["resources"])
