"""The KServe serving runtime and its example InferenceServices, checked against the gateway.

No cluster here: the runtime's container is run as KServe would render it for an example
InferenceService (its name filled in, /mnt/models a copy of the example's storage), on loopback,
and asked what KServe and Knative ask of it. Every autoscaler in the overlays is checked to read
gauges the gateway really exports.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.server import SEND_GRACE_S
from gateway.settings import Settings
from scripts.build_models import affine_weights
from tests.deploy.test_k8s import K8S, OVERLAYS, ROOT, SETTINGS_ENV, render
from tests.support import RunningGateway, start_gateway

# What KServe sends a runtime's traffic to: Knative's and KServe's default container port (HTTP),
# and the gRPC port KServe's own runtimes listen on, which an InferenceService exposes as `h2c`.
KSERVE_HTTP_PORT, KSERVE_GRPC_PORT = 8080, 9000
# The formats the runtime takes, as KServe names them.
FORMATS = {"onnx", "tensorflow", "pytorch", "tflite", "keras"}


@pytest.fixture(scope="module")
def kserve() -> list[dict[str, Any]]:
    return render(K8S / "overlays" / "kserve")


def runtime(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == "ClusterServingRuntime"]
    return found


def services(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == "InferenceService"]


def as_kserve_renders(value: Any, isvc: dict[str, Any]) -> Any:
    """The runtime's container as KServe fills it in for one InferenceService: its Go template
    over the container, given the InferenceService's metadata (only .Name and .Namespace here)."""
    text = yaml.safe_dump(value)
    meta = isvc["metadata"]
    text = text.replace("{{.Name}}", meta["name"]).replace("{{.Namespace}}", meta["namespace"])
    assert "{{" not in text, f"a placeholder this test does not fill: {text}"
    return yaml.safe_load(text)


def flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return value


def test_the_runtime_takes_the_formats_and_protocols(kserve: list[dict[str, Any]]) -> None:
    spec = runtime(kserve)["spec"]
    assert {f["name"] for f in spec["supportedModelFormats"]} == FORMATS
    assert set(spec["protocolVersions"]) == {"v2", "grpc-v2"}
    # Named by InferenceServices, never chosen over KServe's own runtimes.
    assert not any(f.get("autoSelect") for f in spec["supportedModelFormats"])
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"
    tag = container["image"].rpartition(":")[2]
    assert tag and tag != "latest" and any(c.isdigit() for c in tag), container["image"]


def test_the_runtime_listens_where_kserve_sends_traffic(kserve: list[dict[str, Any]]) -> None:
    spec = runtime(kserve)["spec"]
    (container,) = spec["containers"]
    args = container["args"]
    assert args[0] == "serve"
    assert flag(args, "model-repo") == "/mnt/models"
    assert flag(args, "model-name") == "{{.Name}}"
    assert (int(flag(args, "http-port")), int(flag(args, "grpc-port"))) == (
        KSERVE_HTTP_PORT,
        KSERVE_GRPC_PORT,
    )
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) <= SETTINGS_ENV, f"names the gateway does not read: {set(env) - SETTINGS_ENV}"
    assert Settings(**{k.removeprefix("MODELYARD_").lower(): v for k, v in env.items()}).host == "0.0.0.0"
    # No ports of its own: Knative takes one port per container, 8080 unless the InferenceService
    # declares another, and merges a declared one with the runtime's.
    assert "ports" not in container
    assert container["readinessProbe"]["httpGet"]["port"] == KSERVE_HTTP_PORT
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(KSERVE_HTTP_PORT)
    assert spec["annotations"]["prometheus.kserve.io/path"] == "/metrics"


def test_each_example_names_the_runtime_and_what_it_takes(kserve: list[dict[str, Any]]) -> None:
    spec = runtime(kserve)["spec"]
    formats = {(f["name"], f.get("version")) for f in spec["supportedModelFormats"]}
    examples = services(kserve)
    assert {e["spec"]["predictor"]["model"]["protocolVersion"] for e in examples} == {"v2", "grpc-v2"}
    for isvc in examples:
        model = isvc["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime(kserve)["metadata"]["name"]
        assert (model["modelFormat"]["name"], model["modelFormat"].get("version")) in formats
        assert model["protocolVersion"] in spec["protocolVersions"]
        ports = {p["name"]: p["containerPort"] for p in model.get("ports", [])}
        if model["protocolVersion"] == "grpc-v2":
            # KServe's Service sends its port 80 to the first container port: gRPC here.
            assert next(iter(ports)) == "h2c" and ports["h2c"] == KSERVE_GRPC_PORT
        assert ports.get("http1", KSERVE_HTTP_PORT) == KSERVE_HTTP_PORT
        # KEDA's query sums this service's predictor pods, not every modelyard pod in the namespace.
        for metric in isvc["spec"]["predictor"].get("autoScaling", {}).get("metrics", []):
            query = metric["external"]["metric"]["query"]
            meta = isvc["metadata"]
            assert f'namespace="{meta["namespace"]}"' in query, query
            assert f'pod=~"{meta["name"]}-predictor-.*"' in query, query
        # pvc://CLAIM/PATH: the example's folder on the base's model volume.
        claim, _, path = model["storageUri"].removeprefix("pvc://").partition("/")
        base = render(K8S / "base")
        assert any(o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == claim for o in base)
        assert path.startswith("gateway/") and (ROOT / "model_repo" / path.removeprefix("gateway/")).is_dir()


@pytest.fixture(scope="module")
def as_in_a_pod(
    kserve: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningGateway, dict[str, Any], str]]:
    """The runtime's container for the REST example, run on loopback: its arguments and
    variables as KServe renders them, /mnt/models a copy of the example's folder."""
    (isvc,) = [e for e in services(kserve) if e["spec"]["predictor"]["model"]["protocolVersion"] == "v2"]
    container = as_kserve_renders(runtime(kserve)["spec"]["containers"][0], isvc)
    folder = tmp_path_factory.mktemp("pod") / "mnt-models"
    storage = isvc["spec"]["predictor"]["model"]["storageUri"].removeprefix("pvc://modelyard-models/gateway/")
    shutil.copytree(ROOT / "model_repo" / storage, folder)
    # The ports are the fixture's free ones (checked to be KServe's above), the host loopback.
    args = [a.replace("/mnt/models", str(folder)) for a in container["args"][1:] if "-port=" not in a]
    env = {e["name"]: e["value"] for e in container["env"]} | {"MODELYARD_HOST": "127.0.0.1"}
    running = start_gateway(folder, folder.parent / "log.txt", *args, env=env)
    yield running, container, isvc["metadata"]["name"]
    running.stop()


def test_the_runtime_container_serves_the_model_under_the_services_name(
    as_in_a_pod: tuple[RunningGateway, dict[str, Any], str],
) -> None:
    gateway, container, name = as_in_a_pod
    probe = container["readinessProbe"]["httpGet"]["path"]
    assert probe == f"/v2/models/{name}/ready"
    assert httpx.get(f"{gateway.url}{probe}").status_code == 200
    x = np.array([[1, 2, 3, 4]], dtype=np.float32)
    labels = yaml.safe_load((ROOT / "model_repo" / name / "config.yaml").read_text())["labels"]
    for module, address in ((triton_http, gateway.http), (triton_grpc, gateway.grpc)):
        client = module.InferenceServerClient(address)
        try:
            tensor = module.InferInput("x", [1, 4], "FP32")
            tensor.set_data_from_numpy(x)
            for label, version in labels.items():
                result = client.infer(name, [tensor], model_version=label)
                weight, bias = affine_weights(version)
                np.testing.assert_allclose(result.as_numpy("y"), x @ weight + bias, rtol=1e-5, atol=1e-6)
        finally:
            client.close()


def exported_metrics(gateway: RunningGateway) -> set[str]:
    text = httpx.get(f"{gateway.url}/metrics").text
    return {family.name for family in text_string_to_metric_families(text)}


def asked_for(obj: dict[str, Any]) -> list[str]:
    """The gateway metrics an autoscaler reads: in Prometheus queries, adapter rules, HPA metrics."""
    text = yaml.safe_dump(obj)
    if obj["kind"] == "ConfigMap":
        text = "\n".join(obj.get("data", {}).values())
    return sorted(set(re.findall(r"\bmodelyard_[a-z_]+[a-z]\b", text)))


def test_every_autoscaler_reads_gauges_the_gateway_exports(
    as_in_a_pod: tuple[RunningGateway, dict[str, Any], str],
) -> None:
    exported = exported_metrics(as_in_a_pod[0])
    assert {"modelyard_gateway_inflight_requests", "modelyard_gateway_queued_requests"} <= exported
    checked = 0
    for overlay in OVERLAYS:
        for obj in render(K8S / "overlays" / overlay):
            scaling = obj["kind"] in ("ScaledObject", "HorizontalPodAutoscaler", "InferenceService") or (
                obj["kind"] == "ConfigMap" and "prometheus-adapter" in obj["metadata"]["name"]
            )
            if not scaling:
                continue
            for metric in asked_for(obj):
                assert metric in exported, (
                    f"{overlay}: {obj['kind']} {obj['metadata']['name']} reads {metric}"
                )
                checked += 1
    assert checked >= 4


def test_the_runtime_drains_inside_the_pods_grace(kserve: list[dict[str, Any]]) -> None:
    """KServe leaves the pod's terminationGracePeriodSeconds at Kubernetes' default unless an
    InferenceService sets it: the preStop sleep, the drain and closing must all fit in it."""
    (container,) = runtime(kserve)["spec"]["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    assert pre_stop >= container["readinessProbe"]["periodSeconds"]
    env = {e["name"]: e["value"] for e in container["env"]}
    grace = float(env.get("MODELYARD_SHUTDOWN_GRACE_S", Settings.model_fields["shutdown_grace_s"].default))
    assert float(Settings.model_fields["http_keepalive_timeout_s"].default) < grace
    closing_backends_s = 5
    pod_grace = min(
        (s["spec"]["predictor"].get("terminationGracePeriodSeconds", 30) for s in services(kserve)),
        default=30,
    )
    assert pre_stop + grace + SEND_GRACE_S + 1 + closing_backends_s <= pod_grace
