"""Triton's model configuration extension: a model's description in the shape of Triton's
`ModelConfig`, as a dict that the v2 REST endpoint writes as JSON and the gRPC servicer parses
into `model_config_pb2.ModelConfig`; and the other way, a repository load's config override read
into config.yaml's keys. Its refusals say "failed to load", as Triton's do."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson

from gateway.config import ModelConfig
from gateway.errors import InvalidInput, MalformedRequest, Unsupported
from gateway.types import Datatype, ModelDescription, TensorSpec

_TRITON_TYPE = {d: f"TYPE_{'STRING' if d is Datatype.BYTES else d.value}" for d in Datatype}


def model_config(description: ModelDescription) -> dict[str, Any]:
    policy = description.version_policy
    if policy.all:
        version_policy: dict[str, Any] = {"all": {}}
    elif policy.specific is not None:
        version_policy = {"specific": {"versions": list(policy.specific)}}
    else:
        version_policy = {"latest": {"num_versions": policy.latest or 1}}
    signature = description.signature
    return {
        "name": description.name,
        "platform": signature.platform,
        "backend": description.backend,
        "version_policy": version_policy,
        "max_batch_size": description.max_batch_size,
        "input": [_tensor(spec) for spec in signature.inputs],
        "output": [_tensor(spec) for spec in signature.outputs],
    }


def _tensor(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "data_type": _TRITON_TYPE[spec.datatype], "dims": list(spec.shape)}


# Triton's platforms, and its backends' names where they differ, as this gateway's backends.
_PLATFORM_BACKENDS = {
    "onnxruntime_onnx": "onnxruntime",
    "tensorflow_savedmodel": "tensorflow",
    "pytorch_libtorch": "torchserve",
}
_TRITON_BACKENDS = {"pytorch": "torchserve"}
_DATATYPE_OF_TRITON = {name: datatype for datatype, name in _TRITON_TYPE.items()}
_DYNAMIC_BATCHING = {
    "max_queue_delay_microseconds": "max_queue_delay_us",
    "preferred_batch_size": "preferred_batch_sizes",
}
# config.yaml's own keys, which an override may also use.
_CONFIG_KEYS = frozenset(ModelConfig.model_fields)
_TRITON_KEYS = frozenset(
    {"name", "platform", "max_batch_size", "dynamic_batching", "version_policy", "input", "output"}
)


def load_parameters(model: str, parameters: Mapping[str, Any]) -> dict[str, Any] | None:
    """A repository load's parameters: its `config` (Triton's ModelConfig as JSON) as config.yaml
    keys, or None for a load from the model's folder as it is. Other parameters are refused."""
    others = sorted(set(parameters) - {"config"})
    if others:
        files = [name for name in others if name.startswith("file:")]
        what = "model files in the request" if files else f"the parameters {others}"
        raise Unsupported(f"failed to load '{model}', this gateway does not take {what}")
    if "config" not in parameters:
        return None
    text = parameters["config"]
    if not isinstance(text, str):
        raise MalformedRequest(f"failed to load '{model}', the config parameter must be a JSON string")
    return config_override(model, text)


def config_override(model: str, text: str) -> dict[str, Any]:
    """Triton's ModelConfig in JSON, as config.yaml's keys: max_batch_size and dynamic_batching
    become `batching`, version_policy, input and output become `version_policy`, `inputs` and
    `outputs` (dims are the whole shape, as this gateway's model config reports them), platform
    becomes `backend`; config.yaml's own keys pass as they are. Any other key is refused."""

    def refused(why: str) -> InvalidInput:
        return InvalidInput(f"failed to load '{model}', {why}")

    try:
        given = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise MalformedRequest(f"failed to load '{model}', the config is not JSON: {exc}") from None
    if not isinstance(given, dict):
        raise MalformedRequest(f"failed to load '{model}', the config must be a JSON object")
    unknown = sorted(set(given) - _TRITON_KEYS - _CONFIG_KEYS)
    if unknown:
        raise refused(
            f"the config keys {unknown} have no counterpart in config.yaml; a config may give "
            f"{', '.join(sorted(_TRITON_KEYS | _CONFIG_KEYS))}"
        )
    override = {k: v for k, v in given.items() if k in _CONFIG_KEYS and k not in _TRITON_KEYS}
    if given.get("name", model) != model:
        raise refused(f"the config names model '{given['name']}'")
    backends = set()
    if "backend" in given:
        backends.add(_TRITON_BACKENDS.get(given["backend"], given["backend"]))
    if "platform" in given:
        if given["platform"] not in _PLATFORM_BACKENDS:
            raise refused(f"platform '{given['platform']}' is none of {', '.join(_PLATFORM_BACKENDS)}")
        backends.add(_PLATFORM_BACKENDS[given["platform"]])
    if len(backends) > 1:
        raise refused(f"the config names two backends: {', '.join(sorted(map(str, backends)))}")
    if backends:
        override["backend"] = backends.pop()
    batching: dict[str, Any] = {}
    if "max_batch_size" in given:
        batching["max_batch_size"] = _integer(given["max_batch_size"], "max_batch_size", refused)
    dynamic = given.get("dynamic_batching", {})
    if not isinstance(dynamic, dict) or set(dynamic) - set(_DYNAMIC_BATCHING):
        raise refused(f"dynamic_batching takes only {', '.join(_DYNAMIC_BATCHING)}")
    for key, value in dynamic.items():
        if key == "preferred_batch_size":
            batching[_DYNAMIC_BATCHING[key]] = [_integer(v, key, refused) for v in value]
        else:
            batching[_DYNAMIC_BATCHING[key]] = _integer(value, key, refused)
    if batching:
        override["batching"] = batching
    if "version_policy" in given:
        override["version_policy"] = _version_policy(given["version_policy"])
    for key in ("input", "output"):
        if key in given:
            override[f"{key}s"] = [_tensor_decl(t, refused) for t in given[key]]
    return override


def _integer(value: Any, key: str, refused: Callable[[str], InvalidInput]) -> int:
    # Protobuf's JSON writes 64-bit integers as strings; tritonclient's examples send "16".
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    raise refused(f"{key} must be an integer, not {value!r}")


def _version_policy(policy: Any) -> Any:
    """Triton's {latest: {num_versions: N}} and {specific: {versions: [...]}} in config.yaml's words;
    anything else passes to config.yaml's own validation."""
    if isinstance(policy, dict):
        latest, specific = policy.get("latest"), policy.get("specific")
        if isinstance(latest, dict) and "num_versions" in latest:
            return {"latest": latest["num_versions"]}
        if isinstance(specific, dict) and "versions" in specific:
            return {"specific": specific["versions"]}
    return policy


def _tensor_decl(tensor: Any, refused: Callable[[str], InvalidInput]) -> dict[str, Any]:
    if not isinstance(tensor, dict) or not {"name", "data_type", "dims"} <= set(tensor):
        raise refused("each input and output names its name, data_type and dims")
    datatype = _DATATYPE_OF_TRITON.get(tensor["data_type"])
    if datatype is None:
        raise refused(f"tensor '{tensor['name']}' has data_type {tensor['data_type']!r}, which is no TYPE_*")
    dims = [_integer(d, "dims", refused) for d in tensor["dims"]]
    return {"name": tensor["name"], "datatype": datatype.value, "shape": dims}
