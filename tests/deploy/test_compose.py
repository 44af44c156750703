"""docker-compose.yml and the files under deploy/ it uses, validated offline (no Docker engine here).

`docker-compose config` parses and normalises the file; the rest reads what it rendered and checks
it against the repository and against a real gateway: every mounted path exists, every image is
pinned, the health checks ask endpoints the gateway really answers, the env names are settings the
gateway really reads, and the ports line up between services, Prometheus and the model configs.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from gateway.repository import scan
from gateway.settings import Settings
from tests.support import RunningGateway, free_port, start_gateway, torchserve_missing

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SETTINGS_ENV = {f"MODELYARD_{name.upper()}" for name in Settings.model_fields}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as docker-compose itself reads it: merged, interpolated, paths made absolute."""
    if shutil.which("docker-compose") is None:
        pytest.skip(
            "docker-compose is not installed: run `make deploy-tools` as root (Debian package docker-compose)"
        )
    result = subprocess.run(
        ["docker-compose", "-p", "modelyard", "config"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    rendered: dict[str, Any] = yaml.safe_load(result.stdout)
    return rendered


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = compose["services"]
    return found


def http_path(command: list[str] | str) -> str:
    """The path of the one http://127.0.0.1 URL in a health check command."""
    text = command if isinstance(command, str) else " ".join(command)
    # The port may be a number or a Python f-string field reading MODELYARD_HTTP_PORT.
    paths = re.findall(r"http://127\.0\.0\.1:(?:\d+|\{[^}]*\})(/[^'\"\s\\]*)", text)
    assert len(paths) == 1, f"expected one loopback URL in {text!r}"
    return str(paths[0])


def published_ports(service: dict[str, Any]) -> set[tuple[str, int, int]]:
    """(host address, host port, container port) for each port, as docker-compose 1.29 renders them."""
    ports = set()
    for port in service.get("ports", []):
        host_ip, published, target = port.split("/")[0].split(":")
        ports.add((host_ip, int(published), int(target)))
    return ports


def test_the_stack_has_the_services_the_design_names(services: dict[str, Any]) -> None:
    assert set(services) == {"gateway", "tfserving", "torchserve", "prometheus", "grafana"}


def test_every_image_is_pinned_to_a_version(services: dict[str, Any]) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name, service in services.items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), (
            f"{name}: {image!r} is not pinned to a version"
        )
    # The gateway image is built here: its tag is the package's version.
    assert services["gateway"]["image"] == f"modelyard:{version}"


def test_the_dockerfile_is_multi_stage_non_root_and_pinned() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, re.MULTILINE)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base[1]), "the base image is not pinned"
    stages = re.findall(r"^FROM (\S+) AS (\w+)$", dockerfile, re.MULTILINE)
    assert [stage for _, stage in stages] == ["build", "runtime"]
    assert "COPY --from=build /opt/modelyard /opt/modelyard" in dockerfile
    user = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert user and all(part.isdigit() and int(part) > 0 for part in user[-1].split(":"))
    # Build args choose the extras: a plain build installs no extra at all.
    assert re.search(r'^ARG EXTRAS=""$', dockerfile, re.MULTILINE)
    assert 'pip install ".${EXTRAS:+[${EXTRAS}]}"' in dockerfile
    exposed = re.search(r"^EXPOSE (.+)$", dockerfile, re.MULTILINE)
    assert exposed and exposed[1].split() == [
        str(Settings.model_fields["http_port"].default),
        str(Settings.model_fields["grpc_port"].default),
    ]
    env_names = set(re.findall(r"\b(MODELYARD_\w+)=", dockerfile))
    assert env_names and env_names <= SETTINGS_ENV
    assert "MODELYARD_HOST=0.0.0.0" in dockerfile


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "models.Dockerfile"])
def test_the_build_context_holds_what_each_dockerfile_copies(dockerfile: str) -> None:
    let_in = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().split() if line[0] == "!"]
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (DEPLOY / dockerfile).read_text(), re.MULTILINE)
    assert copied
    for sources in copied:
        for source in sources.split():
            assert any(fnmatch.fnmatch(source, rule) or source.startswith(rule + "/") for rule in let_in), (
                f".dockerignore leaves out {source}"
            )
            if source.startswith("deploy/torchserve/model-store/"):
                # Built by `make torchserve-store`, under the name its pattern rule gives.
                assert re.fullmatch(r"deploy/torchserve/model-store/mlp_torch-v[12]\.mar", source)
                continue
            assert (ROOT / source).exists(), f"{dockerfile} copies {source}, which is not in the repo"


def test_every_mounted_path_exists(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = Path(volume.split(":")[0])
            assert source.is_absolute() and ROOT in source.parents, f"{name}: {volume} is not a repo path"
            assert source.exists(), f"{name}: {source.relative_to(ROOT)} is not in the repository"
    build = services["gateway"]["build"]
    assert (Path(build["context"]) / build["dockerfile"]).is_file()


def test_the_tfserving_configs_parse_as_tf_serving_reads_them() -> None:
    text_format = pytest.importorskip("google.protobuf.text_format", reason="needs protobuf")
    config_pb2 = pytest.importorskip(
        "tensorflow_serving.config.model_server_config_pb2", reason="needs the tensorflow extra"
    )
    config = text_format.Parse(
        (DEPLOY / "tfserving" / "models.config").read_text(), config_pb2.ModelServerConfig()
    )
    (model,) = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == (
        "affine_tf",
        "/models/affine_tf",
        "tensorflow",
    )
    assert model.model_version_policy.WhichOneof("policy_choice") == "all"
    assert dict(model.version_labels) == {"stable": 1, "canary": 2}
    # The pip package has no MonitoringConfig proto: read its two fields as text.
    monitoring = (DEPLOY / "tfserving" / "monitoring.config").read_text()
    assert re.search(r"^\s*enable: true$", monitoring, re.MULTILINE)
    monitoring_path = re.search(r'^\s*path: "([^"]+)"$', monitoring, re.MULTILINE)
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    paths = {job["job_name"]: job["metrics_path"] for job in prometheus["scrape_configs"]}
    assert monitoring_path and paths["tfserving"] == monitoring_path[1]
    # The labels TF Serving knows are the ones the gateway's config gives.
    assert scan(DEPLOY / "compose-model-repo")["affine_tf"].config.labels == dict(model.version_labels)


def test_the_tfserving_mounts_match_its_model_config(services: dict[str, Any]) -> None:
    config = (DEPLOY / "tfserving" / "models.config").read_text()
    base_path = re.search(r'base_path: "([^"]+)"', config)
    assert base_path
    targets = {
        volume.split(":")[1]: Path(volume.split(":")[0]) for volume in services["tfserving"]["volumes"]
    }
    versions = sorted(t for t in targets if t.startswith(base_path[1] + "/"))
    assert versions == [f"{base_path[1]}/1", f"{base_path[1]}/2"]
    for target in versions:
        assert targets[target].name == "model.savedmodel", "TF Serving needs saved_model.pb at <version>/"
    flags = " ".join(services["tfserving"]["command"])
    assert "--port=8500" in flags and "--rest_api_port=8501" in flags
    for flag in ("model_config_file", "monitoring_config_file"):
        path = re.search(rf"--{flag}=/config/(\S+)", flags)
        assert path and (DEPLOY / "tfserving" / path[1]).is_file(), (
            f"--{flag} names no file in deploy/tfserving"
        )


def test_start_up_is_ordered_by_health(services: dict[str, Any]) -> None:
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"}, f"{name} -> {dependency}"
    assert set(services["gateway"]["depends_on"]) == {"tfserving", "torchserve"}
    assert set(services["prometheus"]["depends_on"]) == {"gateway"}
    assert set(services["grafana"]["depends_on"]) == {"prometheus"}


def test_the_gateway_service_uses_real_settings_and_ports(services: dict[str, Any]) -> None:
    gateway = services["gateway"]
    environment = gateway["environment"]
    assert set(environment) <= SETTINGS_ENV, f"unknown settings: {set(environment) - SETTINGS_ENV}"
    assert environment["MODELYARD_HOST"] == "0.0.0.0"
    http_port, grpc_port = int(environment["MODELYARD_HTTP_PORT"]), int(environment["MODELYARD_GRPC_PORT"])
    assert (http_port, grpc_port) == (8000, 8001)
    assert published_ports(gateway) == {("127.0.0.1", 8000, 8000), ("127.0.0.1", 8001, 8001)}
    # Every other published port binds the host's loopback too.
    for name, service in services.items():
        for host_ip, published, _ in published_ports(service):
            assert host_ip == "127.0.0.1", f"{name} publishes {published} beyond loopback"
    # Settings accept what compose passes (the same parsing the container does).
    settings = Settings(**{k.removeprefix("MODELYARD_").lower(): v for k, v in environment.items()})
    assert settings.model_repo == Path("/models")
    mounted = {Path(v.split(":")[1]) for v in gateway["volumes"]}
    assert all(target.parent == settings.model_repo for target in mounted)


def test_health_checks_ask_what_the_gateway_answers(services: dict[str, Any], http: httpx.Client) -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    healthcheck = re.search(r"^HEALTHCHECK .*\n\s+CMD (.+)$", dockerfile, re.MULTILINE)
    assert healthcheck
    paths = {http_path(healthcheck[1]), http_path(services["gateway"]["healthcheck"]["test"])}
    assert paths == {"/v2/health/ready"}
    for path in paths:
        answer = http.get(path)
        assert answer.status_code == 200 and answer.json() == {"ready": True}


def test_the_compose_model_repository_is_valid_and_points_at_the_services(services: dict[str, Any]) -> None:
    repo = DEPLOY / "compose-model-repo"
    entries = scan(repo)
    assert {name: entry.problems for name, entry in entries.items()} == {"affine_tf": (), "mlp_torch": ()}
    assert entries["mlp_torch"].backend == "torchserve" and entries["affine_tf"].backend == "tfserving"
    # The versions each backend serves: both archives (make torchserve-store), both SavedModels.
    assert [v.version for v in entries["mlp_torch"].versions] == [1, 2]
    assert [v.version for v in entries["affine_tf"].versions] == [1, 2]
    torchserve = entries["mlp_torch"].config.section("torchserve")
    assert torchserve["mode"] == "remote"
    properties = dict(
        line.split("=", 1)
        for line in (DEPLOY / "torchserve" / "config.properties").read_text().splitlines()
        if line and not line.startswith("#")
    )
    exposed = set(services["torchserve"]["expose"])
    for key, address in (("inference_url", "inference_address"), ("management_url", "management_address")):
        ours, theirs = urlsplit(torchserve[key]), urlsplit(properties[address])
        assert ours.hostname == "torchserve" and ours.port == theirs.port, f"{key} vs {address}"
        assert str(theirs.port) in exposed
    # The compose health check waits for the very model the gateway asks for.
    assert f"/models/{torchserve['model_name']}'" in " ".join(services["torchserve"]["healthcheck"]["test"])
    host, port = entries["affine_tf"].config.section("tfserving")["grpc"].split(":")
    assert host == "tfserving" and port in services["tfserving"]["expose"]
    tf_name = entries["affine_tf"].config.section("tfserving")["model_name"]
    assert f'name: "{tf_name}"' in (DEPLOY / "tfserving" / "models.config").read_text()
    assert f"/v1/models/{tf_name} " in " ".join(services["tfserving"]["healthcheck"]["test"])


def test_prometheus_scrapes_the_gateway_and_torchserve(services: dict[str, Any]) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: target
        for job in config["scrape_configs"]
        for group in job["static_configs"]
        for target in group["targets"]
    }
    assert targets["modelyard"] == "gateway:8000"
    assert targets["torchserve"] == "torchserve:8082"
    for job, target in targets.items():
        service, port = target.split(":")
        assert service in services, f"{job} scrapes {service}, which is not in the stack"
        if service != "gateway":
            assert port in services[service]["expose"], f"{job}: {service} does not expose {port}"
    properties = (DEPLOY / "torchserve" / "config.properties").read_text()
    assert "metrics_address=http://0.0.0.0:8082" in properties and "metrics_mode=prometheus" in properties


def test_the_dashboard_queries_metrics_the_gateway_exports(http: httpx.Client) -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "modelyard.json").read_text())
    # Make sure the histograms have series: one request, then read what /metrics names.
    http.post(
        "/v2/models/affine/infer",
        json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]},
    ).raise_for_status()
    exported = set(re.findall(r"^(modelyard_\w+?)(?:\{| )", http.get("/metrics").text, re.MULTILINE))
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\bmodelyard_\w+", expr)}
    assert used and used <= exported, (
        f"the dashboard queries series the gateway does not export: {used - exported}"
    )
    titles = " ".join(panel["title"] for panel in dashboard["panels"])
    for wanted in ("Request rate", "Errors", "p50", "p99"):
        assert wanted in titles
    by_labels = [expr for expr in exprs if "sum by (model, version, backend" in expr]
    assert any("histogram_quantile(0.5," in e for e in by_labels)
    assert any("histogram_quantile(0.99," in e for e in by_labels)
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "modelyard.yml").read_text()
    )
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert {d["uid"] for d in datasource["datasources"]} == {
        target["datasource"]["uid"] for panel in dashboard["panels"] for target in panel["targets"]
    }
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_the_smoke_script_passes_on_a_served_model_and_fails_on_a_missing_one(
    gateway: RunningGateway,
) -> None:
    script = [sys.executable, str(DEPLOY / "smoke.py"), "--url", gateway.url]
    passed = subprocess.run([*script, "--only", "affine", "--wait-s", "30"], capture_output=True, text=True)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert passed.stdout.startswith("ok    affine (onnxruntime): version 1, y [2, 3]")
    # The test gateway serves affine_tf in-process with TensorFlow, not through TF Serving (or not
    # at all, without the tensorflow extra): the smoke check must say so, not pass.
    failed = subprocess.run([*script, "--only", "affine_tf", "--wait-s", "2"], capture_output=True, text=True)
    assert failed.returncode == 1
    if importlib.util.find_spec("tensorflow") is not None:
        reason = "/metrics counted no successful request on backend tfserving"
    else:
        reason = "GET /v2/models/affine_tf/ready did not answer 200 in time"
    assert failed.stdout.startswith(f"FAIL  affine_tf (tfserving): {reason}"), failed.stdout


@pytest.fixture(scope="module")
def stack_torchserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The stack's TorchServe, run here: deploy/torchserve/config.properties over the store that
    `make torchserve-store` builds, with only its addresses moved to free loopback ports."""
    reason = torchserve_missing()
    if reason:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("stack-torchserve")
    store = workdir / "model-store"
    store.mkdir()
    built = subprocess.run(
        ["make", "--no-print-directory", "torchserve-store", f"TS_STORE={store}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert sorted(p.name for p in store.iterdir()) == ["mlp_torch-v1.mar", "mlp_torch-v2.mar"]
    ports = {name: free_port() for name in ("inference", "management", "metrics", "grpc", "grpc_management")}
    # enable_envvars_config=true in the file lets TS_* variables move the addresses.
    env = {
        **os.environ,
        "TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{ports['inference']}",
        "TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{ports['management']}",
        "TS_METRICS_ADDRESS": f"http://127.0.0.1:{ports['metrics']}",
        "TS_GRPC_INFERENCE_PORT": str(ports["grpc"]),
        "TS_GRPC_MANAGEMENT_PORT": str(ports["grpc_management"]),
        "TMPDIR": str(workdir),
        "LOG_LOCATION": str(workdir),
    }
    command = [str(Path(sys.executable).with_name("torchserve")), "--start", "--foreground", "--ncs",
               "--ts-config", str(DEPLOY / "torchserve" / "config.properties"), "--model-store", str(store)]  # fmt: skip
    log = workdir / "torchserve.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, f"TorchServe exited:\n{log.read_text(errors='replace')[-3000:]}"
            assert time.monotonic() < deadline, (
                f"TorchServe not ready:\n{log.read_text(errors='replace')[-3000:]}"
            )
            with contextlib.suppress(httpx.HTTPError, ValueError):
                versions = httpx.get(f"{urls['management']}/models/mlp_torch/all", timeout=2).json()
                if len(versions) == 2 and all(w["status"] == "READY" for v in versions for w in v["workers"]):
                    break
            time.sleep(0.5)
        yield urls
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_the_stack_torchserve_serves_the_store_to_the_gateway_in_remote_mode(
    stack_torchserve: dict[str, str], tmp_path: Path
) -> None:
    import numpy as np
    import torch

    urls = stack_torchserve
    # What the compose healthcheck and Prometheus rely on, and what the file turns off.
    assert httpx.get(f"{urls['metrics']}/metrics").text.startswith("# HELP")
    assert httpx.post(f"{urls['management']}/models", params={"url": "x.mar"}).status_code == 405
    # The compose gateway's own config for mlp_torch, with the service names swapped for loopback.
    repo = tmp_path / "repo"
    shutil.copytree(DEPLOY / "compose-model-repo" / "mlp_torch", repo / "mlp_torch")
    config = repo / "mlp_torch" / "config.yaml"
    text = config.read_text()
    for service, address in (
        ("http://torchserve:8080", "inference"),
        ("http://torchserve:8081", "management"),
    ):
        assert service in text
        text = text.replace(service, urls[address])
    config.write_text(text)
    running = start_gateway(repo, tmp_path / "gateway.log")
    try:
        x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
        body = {
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [3, 64], "data": x.ravel().tolist()}]
        }
        for version in (1, 2):
            answer = httpx.post(f"{running.url}/v2/models/mlp_torch/versions/{version}/infer", json=body)
            assert answer.status_code == 200, answer.text
            (output,) = answer.json()["outputs"]
            module = torch.jit.load(str(ROOT / "model_repo" / "mlp_torch" / str(version) / "model.pt"))
            with torch.no_grad():
                expected = module(torch.from_numpy(x)).numpy()
            got = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        smoke = subprocess.run(
            [sys.executable, str(DEPLOY / "smoke.py"), "--url", running.url, "--only", "mlp_torch"],
            capture_output=True,
            text=True,
        )
        assert smoke.returncode == 0, smoke.stdout + smoke.stderr
        assert smoke.stdout.startswith("ok    mlp_torch (torchserve)")
    finally:
        assert running.stop() == 0


def test_the_compose_tfserving_config_serves_through_a_tf_serving_api(
    gateway: RunningGateway, tmp_path: Path
) -> None:
    """No TF Serving binary here: the session gateway's TF Serving front door (the in-process
    TensorFlow `affine_tf`, the same SavedModels) stands in for the stack's TF Serving."""
    if importlib.util.find_spec("tensorflow_serving") is None:
        pytest.skip("the tensorflow extra is not installed: no TF Serving front door to stand in")
    repo = tmp_path / "repo"
    shutil.copytree(DEPLOY / "compose-model-repo" / "affine_tf", repo / "affine_tf")
    config = repo / "affine_tf" / "config.yaml"
    assert '"tfserving:8500"' in config.read_text()
    config.write_text(config.read_text().replace('"tfserving:8500"', f'"{gateway.grpc}"'))
    running = start_gateway(repo, tmp_path / "gateway.log")
    try:
        for version in ("1", "2", "stable", "canary"):
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
            ours = httpx.post(f"{running.url}/v2/models/affine_tf/versions/{version}/infer", json=body)
            theirs = httpx.post(f"{gateway.url}/v2/models/affine_tf/versions/{version}/infer", json=body)
            assert ours.status_code == 200, ours.text
            assert ours.json()["outputs"] == theirs.json()["outputs"]
        smoke = subprocess.run(
            [sys.executable, str(DEPLOY / "smoke.py"), "--url", running.url, "--only", "affine_tf"],
            capture_output=True,
            text=True,
        )
        assert smoke.returncode == 0, smoke.stdout + smoke.stderr
        assert smoke.stdout.startswith("ok    affine_tf (tfserving)")
    finally:
        assert running.stop() == 0
