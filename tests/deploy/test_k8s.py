"""The Kubernetes manifests, validated offline (no cluster here).

Each overlay is rendered with `kubectl kustomize`, every object is checked against the bundled
OpenAPI schemas of a current Kubernetes (kubernetes-validate, strict: unknown fields fail), and the
rendered gateway is checked against the real one: the env names are settings the gateway reads, the
ports are the ones it serves, and the probe paths answer on a running gateway.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from gateway.server import SEND_GRACE_S
from gateway.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
# Overlays of KServe objects only: KServe makes their pods, so they hold no gateway Deployment.
KSERVE_OVERLAYS = ("kserve",)
STACK_OVERLAYS = [name for name in OVERLAYS if name not in KSERVE_OVERLAYS]
# The API groups of custom resources, checked against their CRDs' schemas in test_crds.py;
# kubernetes-validate knows only the built-in kinds.
CUSTOM_GROUPS = ("serving.kserve.io", "keda.sh")
# The newest Kubernetes whose schemas kubernetes-validate bundles.
KUBERNETES_VERSION = kubernetes_validate.latest_version()
SETTINGS_ENV = {f"MODELYARD_{name.upper()}" for name in Settings.model_fields}
GATEWAY = "modelyard-gateway"
BACKENDS = ("tfserving", "torchserve")


def render(target: Path) -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (Debian package kubectl): the manifests cannot be rendered")
    result = subprocess.run(["kubectl", "kustomize", str(target)], capture_output=True, text=True)
    assert result.returncode == 0, f"kubectl kustomize {target.relative_to(ROOT)} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=STACK_OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(K8S / "overlays" / request.param)


@pytest.fixture(scope="module", params=OVERLAYS)
def any_overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(K8S / "overlays" / request.param)


def group_of(obj: dict[str, Any]) -> str:
    api_version: str = obj["apiVersion"]
    return api_version.rpartition("/")[0]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(name)]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def containers(deployment: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def main_container(deployment: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return found


def test_there_are_dev_and_prod_overlays() -> None:
    assert {"dev", "prod"} <= set(OVERLAYS)


def test_the_base_renders() -> None:
    kinds = sorted(o["kind"] for o in render(K8S / "base"))
    assert kinds.count("Deployment") == 3 and kinds.count("Service") == 3
    for kind in ("HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "ConfigMap"):
        assert kind in kinds


def test_every_object_passes_the_schema_check(any_overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = any_overlay
    assert objects, f"{name} renders nothing"
    for obj in objects:
        if group_of(obj) in CUSTOM_GROUPS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {obj['kind']} {obj['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_every_image_is_pinned(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = overlay
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        for container in containers(deployment):
            image = container["image"]
            tag = image.rpartition(":")[2] if ":" in image else ""
            assert tag and tag != "latest" and any(c.isdigit() for c in tag), f"{image} is not pinned"


def test_the_gateway_reads_real_settings_and_serves_real_ports(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = overlay
    deployment = find(objects, "Deployment", GATEWAY)
    container = main_container(deployment)
    config_name = container["envFrom"][0]["configMapRef"]["name"]
    settings_map = find(objects, "ConfigMap", config_name)
    assert settings_map["metadata"]["name"] == config_name
    env = dict(settings_map["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", [])})
    assert set(env) <= SETTINGS_ENV, f"names the gateway does not read: {set(env) - SETTINGS_ENV}"
    # The values parse as the gateway parses them.
    settings = Settings(**{k.removeprefix("MODELYARD_").lower(): v for k, v in env.items()})
    assert settings.host == "0.0.0.0", "in a pod the gateway must listen beyond loopback"
    assert (settings.http_port, settings.grpc_port) == (8000, 8001)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings.http_port, "grpc": settings.grpc_port}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(settings.model_repo) in mounts
    service = find(objects, "Service", GATEWAY)
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {n: (p["port"], p["targetPort"]) for n, p in service_ports.items()} == {
        "http": (8000, "http"),
        "grpc": (8001, "grpc"),
    }
    assert service_ports["http"]["appProtocol"] == "http"
    assert service_ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.http_port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_gateway_probes_ask_what_it_answers(
    overlay: tuple[str, list[dict[str, Any]]], http: httpx.Client
) -> None:
    _, objects = overlay
    container = main_container(find(objects, "Deployment", GATEWAY))
    probes = {
        kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes["livenessProbe"]["path"] == "/v2/health/live"
    assert probes["readinessProbe"]["path"] == "/v2/health/ready"
    for probe in probes.values():
        assert probe["port"] == "http"
        answer = http.get(probe["path"])
        assert answer.status_code == 200, f"{probe['path']} answered {answer.status_code}"
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}


def test_the_gateway_is_locked_down_and_drains(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = overlay
    deployment = find(objects, "Deployment", GATEWAY)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    for deployment_ in (o for o in objects if o["kind"] == "Deployment"):
        pod_ = deployment_["spec"]["template"]["spec"]
        assert pod_["securityContext"]["runAsNonRoot"] is True
        for container in containers(deployment_):
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, container["name"]
            assert security["allowPrivilegeEscalation"] is False, container["name"]
            assert container["resources"]["requests"] and container["resources"]["limits"], container["name"]
    container = main_container(deployment)
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    settings = find(objects, "ConfigMap", "modelyard-settings")["data"]

    def setting(name: str) -> float:
        configured = settings.get(f"MODELYARD_{name.upper()}")
        return float(configured) if configured else float(Settings.model_fields[name].default)

    grace = setting("shutdown_grace_s")
    # While the pod is Terminating, endpoint controllers and load balancers stop sending to it:
    # the preStop sleep keeps it serving (ready) for at least two readiness periods meanwhile.
    readiness = container["readinessProbe"]
    assert pre_stop >= readiness["periodSeconds"]
    # After SIGTERM the gateway drains within shutdown_grace_s, idle kept-alive connections
    # included (each closes on its keep-alive timeout, which must end within the grace), then
    # takes SEND_GRACE_S to write the last answers and some seconds to close the backends.
    assert setting("http_keepalive_timeout_s") < grace
    closing_backends_s = 5
    # Kubernetes kills the pod after this: it must cover all of it.
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + grace + SEND_GRACE_S + 1 + closing_backends_s


def test_selectors_match_the_pods(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = overlay
    pods = {
        d["metadata"]["name"]: (d["spec"]["template"]["metadata"]["labels"], d)
        for d in objects
        if d["kind"] == "Deployment"
    }
    for name in (GATEWAY, *BACKENDS):
        labels, deployment = pods[name]
        service = find(objects, "Service", name)
        assert service["spec"]["selector"].items() <= labels.items()
        named_ports = {p["name"] for p in main_container(deployment)["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named_ports, f"{name}: no container port {port['targetPort']}"
            assert port.get("appProtocol"), f"{name}: port {port['name']} has no appProtocol"
    for kind in ("HorizontalPodAutoscaler", "PodDisruptionBudget"):
        for obj in (o for o in objects if o["kind"] == kind):
            if kind == "HorizontalPodAutoscaler":
                assert obj["spec"]["scaleTargetRef"]["name"] == GATEWAY
            else:
                assert obj["spec"]["selector"]["matchLabels"].items() <= pods[GATEWAY][0].items()


def test_only_the_gateway_reaches_the_backends(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = overlay
    policy = find(objects, "NetworkPolicy", "backends-from-gateway-only")
    selector = policy["spec"]["podSelector"]["matchExpressions"][0]
    assert selector["key"] == "app.kubernetes.io/name" and sorted(selector["values"]) == sorted(BACKENDS)
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in objects
        if d["kind"] == "Deployment"
    }
    api_ports = {
        p["containerPort"]
        for name in BACKENDS
        for p in main_container(find(objects, "Deployment", name))["ports"]
        if p["name"] != "metrics"
    }
    allowed_to_gateway: set[int] = set()
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule["ports"]}
        sources = rule["from"]
        gateway_only = all(
            s["podSelector"]["matchLabels"].items() <= pods[GATEWAY].items() and "namespaceSelector" not in s
            for s in sources
        )
        if gateway_only:
            allowed_to_gateway |= ports
        else:
            assert not ports & api_ports, f"a rule lets others reach backend API ports {ports & api_ports}"
    assert allowed_to_gateway == api_ports


def test_the_gateway_waits_for_the_backends_it_loads(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = overlay
    spec = find(objects, "Deployment", GATEWAY)["spec"]["template"]["spec"]
    wait = next(c for c in spec["initContainers"] if c["name"] == "wait-for-backends")
    script = " ".join(wait["command"])
    for service in BACKENDS:
        find(objects, "Service", service)
        assert f"http://{service}:" in script
    # The compose model repository's remote URLs resolve to these Services in the same namespace.
    for config in (ROOT / "deploy" / "compose-model-repo").glob("*/config.yaml"):
        text = config.read_text()
        assert "tfserving:8500" in text or "http://torchserve:8080" in text


def test_model_files_reach_the_pods(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = overlay
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        models = volumes["models"]
        if name == "dev":
            # The init container way: an emptyDir filled from the model bundle image.
            assert "emptyDir" in models and "persistentVolumeClaim" not in models
            copy = next(c for c in spec["initContainers"] if c["name"] == "copy-models")
            assert copy["image"].startswith("modelyard-models:")
            assert any(m["name"] == "models" for m in copy["volumeMounts"])
        else:
            # The volume way: the shared ReadOnlyMany claim, each server's own subPath.
            claim = models["persistentVolumeClaim"]["claimName"]
            pvc = find(objects, "PersistentVolumeClaim", claim)
            assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
            mount = next(m for m in main_container(deployment)["volumeMounts"] if m["name"] == "models")
            assert mount["readOnly"] is True and mount["subPath"]


def test_the_backend_configs_are_copies_of_the_compose_ones() -> None:
    for copy, original in (
        ("models.config", "tfserving/models.config"),
        ("monitoring.config", "tfserving/monitoring.config"),
        ("config.properties", "torchserve/config.properties"),
    ):
        assert (K8S / "base" / copy).read_text() == (ROOT / "deploy" / original).read_text(), copy


def test_dev_is_small_and_prod_is_spread_and_autoscaled() -> None:
    dev = render(K8S / "overlays" / "dev")
    assert find(dev, "Deployment", GATEWAY)["spec"]["replicas"] == 1
    assert not [o for o in dev if o["kind"] in ("HorizontalPodAutoscaler", "PodDisruptionBudget")]
    prod = render(K8S / "overlays" / "prod")
    gateway = find(prod, "Deployment", GATEWAY)
    assert gateway["spec"]["replicas"] >= 2
    anti = gateway["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert (
        anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == "kubernetes.io/hostname"
    )
    hpa = find(prod, "HorizontalPodAutoscaler", GATEWAY)
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert "maxUnavailable" in find(prod, "PodDisruptionBudget", GATEWAY)["spec"]


def test_the_gpu_variant_puts_each_backend_on_a_gpu() -> None:
    assert "prod-gpu" in OVERLAYS
    objects = render(K8S / "overlays" / "prod-gpu")
    for name in BACKENDS:
        container = main_container(find(objects, "Deployment", name))
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["image"].endswith("-gpu")
    gateway = main_container(find(objects, "Deployment", GATEWAY))
    assert "nvidia.com/gpu" not in gateway["resources"]["limits"]
    for name in BACKENDS:
        cpu = main_container(find(render(K8S / "overlays" / "prod"), "Deployment", name))
        assert "nvidia.com/gpu" not in cpu["resources"]["limits"]


def test_every_object_is_in_the_namespace(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    """Objects that a component adds in an overlay miss the base's namespace unless it is set again."""
    name, objects = overlay
    for obj in objects:
        if obj["kind"] != "Namespace":
            where = obj["metadata"].get("namespace")
            assert where == "modelyard", f"{name}: {obj['kind']} {obj['metadata']['name']} is in {where}"


def test_one_autoscaler_at_most_drives_the_gateway(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    """KEDA makes an HPA of its own: a second one on the same Deployment would fight it."""
    name, objects = overlay
    drivers = [
        o["kind"]
        for o in objects
        if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")
        and o["spec"]["scaleTargetRef"]["name"] == GATEWAY
    ]
    assert len(drivers) == (0 if name == "dev" else 1), f"{name}: {drivers}"


def test_keda_counts_the_gateway_pods_alone(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    """Other pods in the namespace (InferenceServices on the modelyard runtime) export the same
    gauges: each query must select the scaled Deployment's pods."""
    _, objects = overlay
    for scaled in (o for o in objects if o["kind"] == "ScaledObject"):
        target = scaled["spec"]["scaleTargetRef"]["name"]
        namespace = scaled["metadata"]["namespace"]
        queries = [t["metadata"]["query"] for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
        gateway_queries = [q for q in queries if "modelyard_" in q]
        assert len(gateway_queries) >= 2
        for query in gateway_queries:
            assert f'namespace="{namespace}"' in query and f'pod=~"{target}-.*"' in query, query


def test_the_custom_metrics_hpa_reads_what_the_adapter_serves() -> None:
    objects = render(K8S / "overlays" / "prod-custom-metrics")
    hpa = find(objects, "HorizontalPodAutoscaler", GATEWAY)
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert len(wanted) == 2
    rules_map = find(objects, "ConfigMap", "modelyard-prometheus-adapter-rules")
    rules = yaml.safe_load(rules_map["data"]["prometheus-adapter-rules.yaml"])["rules"]
    served = {}
    for rule in rules:
        # Per pod: the series' namespace and pod labels name the objects the HPA asks about.
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"},
            "pod": {"resource": "pod"},
        }
        served[rule["name"]["as"]] = rule["seriesQuery"]
    assert wanted <= set(served)
    for name in wanted:
        assert served[name].startswith(name + "{"), served[name]
