"""The custom resources (KServe's serving runtimes and InferenceServices, KEDA's ScaledObjects) in
every rendered overlay, checked offline against the openAPIV3Schema of their CRDs as published.

The CRDs are reference data outside the project: `../shared/crds/` next to the repository (CI has
it too), or the folder MODELYARD_TEST_CRDS names. Unknown fields fail, as the API server's strict
field validation (kubectl's default) refuses them.
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.test_k8s import CUSTOM_GROUPS, K8S, OVERLAYS, ROOT, group_of, render


def crds_folder() -> Path:
    given = os.environ.get("MODELYARD_TEST_CRDS")
    folder = Path(given) if given else ROOT.parent / "shared" / "crds"
    if not folder.is_dir():
        pytest.fail(f"no CRDs at {folder}: the custom resources cannot be checked (set MODELYARD_TEST_CRDS)")
    return folder


@dataclass(frozen=True)
class Crd:
    group: str
    kind: str
    namespaced: bool
    # served version -> its schema, closed to unknown fields
    schemas: dict[str, dict[str, Any]]


def closed(schema: Any) -> Any:
    """The schema with every object that lists its properties refusing others, unless it says
    x-kubernetes-preserve-unknown-fields (the API server prunes or, strictly, refuses them)."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def load_crds(folder: Path) -> dict[tuple[str, str], Crd]:
    found = {}
    for path in sorted(folder.glob("*.yaml")):
        # libyaml's loader: the InferenceService CRD alone is 2 MB.
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        spec = crd["spec"]
        schemas = {
            v["name"]: closed(v["schema"]["openAPIV3Schema"]) for v in spec["versions"] if v.get("served")
        }
        kind = spec["names"]["kind"]
        found[(spec["group"], kind)] = Crd(spec["group"], kind, spec["scope"] == "Namespaced", schemas)
    return found


@pytest.fixture(scope="module")
def crds() -> dict[tuple[str, str], Crd]:
    return load_crds(crds_folder())


def problems(obj: dict[str, Any], crds: dict[tuple[str, str], Crd]) -> list[str]:
    """Why the API server would refuse this custom resource: an unknown kind or version, the wrong
    scope, or a schema violation (each with its path)."""
    group, _, version = obj["apiVersion"].rpartition("/")
    crd = crds.get((group, obj["kind"]))
    if crd is None:
        return [f"no CRD for {obj['kind']} in {group}"]
    if version not in crd.schemas:
        return [f"{obj['apiVersion']} is not a served version of {obj['kind']} ({sorted(crd.schemas)})"]
    found = []
    namespace = obj.get("metadata", {}).get("namespace")
    if crd.namespaced and not namespace:
        found.append(f"{obj['kind']} is namespaced but has no namespace")
    if not crd.namespaced and namespace:
        found.append(f"{obj['kind']} is cluster-scoped but names namespace {namespace}")
    validator = jsonschema.Draft4Validator(crd.schemas[version])
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
        found.append(f"{'.'.join(str(p) for p in error.absolute_path) or '(top)'}: {error.message}")
    return found


@functools.cache
def custom_resources(overlay: str) -> tuple[dict[str, Any], ...]:
    """The overlay's custom resources, rendered once (copy one before changing it)."""
    return tuple(o for o in render(K8S / "overlays" / overlay) if group_of(o) in CUSTOM_GROUPS)


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_custom_resource_fits_its_crd(name: str, crds: dict[tuple[str, str], Crd]) -> None:
    for obj in custom_resources(name):
        found = problems(obj, crds)
        assert not found, f"{name}: {obj['kind']} {obj['metadata']['name']}:\n" + "\n".join(found)


def test_the_overlays_hold_each_kind_of_custom_resource() -> None:
    kinds = {o["kind"] for name in OVERLAYS for o in custom_resources(name)}
    assert {"ClusterServingRuntime", "InferenceService", "ScaledObject"} <= kinds


def rendered(kind: str, overlay: str) -> dict[str, Any]:
    found = [o for o in custom_resources(overlay) if o["kind"] == kind]
    return copy.deepcopy(found[0])


def unknown_field(obj: dict[str, Any]) -> None:
    obj["spec"]["supportedModelFormat"] = obj["spec"].pop("supportedModelFormats")


def list_as_string(obj: dict[str, Any]) -> None:
    obj["spec"]["protocolVersions"] = "v2"


def container_field_typo(obj: dict[str, Any]) -> None:
    obj["spec"]["containers"][0]["arg"] = obj["spec"]["containers"][0].pop("args")


def namespaced_runtime(obj: dict[str, Any]) -> None:
    obj["metadata"]["namespace"] = "modelyard"


def unserved_version(obj: dict[str, Any]) -> None:
    obj["apiVersion"] = "serving.kserve.io/v1beta2"


def format_without_name(obj: dict[str, Any]) -> None:
    del obj["spec"]["predictor"]["model"]["modelFormat"]["name"]


def canary_as_text(obj: dict[str, Any]) -> None:
    obj["spec"]["predictor"]["canaryTrafficPercent"] = "ten"


def no_triggers(obj: dict[str, Any]) -> None:
    del obj["spec"]["triggers"]


def replicas_as_text(obj: dict[str, Any]) -> None:
    obj["spec"]["minReplicaCount"] = "three"


@pytest.mark.parametrize(
    ("kind", "overlay", "breakage", "says"),
    [
        ("ClusterServingRuntime", "kserve", unknown_field, "supportedModelFormat"),
        ("ClusterServingRuntime", "kserve", list_as_string, "is not of type 'array'"),
        ("ClusterServingRuntime", "kserve", container_field_typo, "'arg' was unexpected"),
        ("ClusterServingRuntime", "kserve", namespaced_runtime, "cluster-scoped"),
        ("ClusterServingRuntime", "kserve", unserved_version, "not a served version"),
        ("InferenceService", "kserve", format_without_name, "'name' is a required property"),
        ("InferenceService", "kserve", canary_as_text, "is not of type 'integer'"),
        ("ScaledObject", "prod-keda", no_triggers, "'triggers' is a required property"),
        ("ScaledObject", "prod-keda", replicas_as_text, "is not of type 'integer'"),
    ],
)
def test_a_broken_copy_fails_the_check(
    kind: str, overlay: str, breakage: Any, says: str, crds: dict[tuple[str, str], Crd]
) -> None:
    """The check can fail: each deliberately broken copy of a rendered resource is refused."""
    obj = rendered(kind, overlay)
    assert not problems(obj, crds)
    breakage(obj)
    found = problems(obj, crds)
    assert any(says in problem for problem in found), found
