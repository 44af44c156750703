"""Triton's model configuration extension: a model's description in the shape of Triton's
`ModelConfig`, as a dict that the v2 REST endpoint writes as JSON and the gRPC servicer parses
into `model_config_pb2.ModelConfig`."""

from __future__ import annotations

from typing import Any

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
