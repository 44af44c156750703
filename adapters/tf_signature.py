"""A SavedModel signature's tensors as v2 specs, for the two backends that read signatures: the
in-process `tensorflow` one and the remote `tfserving` one. Each passes the TensorFlow module it
imported at load, so importing this module costs nothing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from adapters.base import override_signature
from gateway.errors import ModelNotReady
from gateway.types import TensorSpec, datatype_of


def tensor_spec(tf: Any, name: str, info: Any, label: str) -> tuple[TensorSpec, bool]:
    """A signature tensor (a `TensorInfo`) as a v2 spec, and whether its rank is unknown."""
    try:
        datatype = datatype_of(np.dtype(tf.dtypes.as_dtype(info.dtype).as_numpy_dtype))
    except (TypeError, ValueError):
        raise ModelNotReady(
            f"{label}: tensor '{name}' has dtype {tf.dtypes.as_dtype(info.dtype).name}, which modelyard cannot serve"
        ) from None
    if info.tensor_shape.unknown_rank:
        return TensorSpec(name, datatype, ()), True
    shape = tuple(d.size if d.size >= 0 else -1 for d in info.tensor_shape.dim)
    return TensorSpec(name, datatype, shape), False


def signature_of(
    tf: Any, tensors: Mapping[str, Any], declared: Sequence[Any] | None, label: str
) -> tuple[TensorSpec, ...]:
    """One side of a signature, completed by config.yaml's declarations, which must give the
    shape of any tensor whose rank the signature leaves unknown."""
    specs, unknown_rank = [], set()
    for name in sorted(tensors):
        spec, unknown = tensor_spec(tf, name, tensors[name], label)
        specs.append(spec)
        if unknown:
            unknown_rank.add(name)
    merged = override_signature(tuple(specs), declared, label)
    declared_names = {d.name for d in declared or ()}
    missing = sorted(unknown_rank - declared_names)
    if missing:
        raise ModelNotReady(
            f"{label}: tensor(s) {', '.join(missing)} have no known rank; declare their shapes in config.yaml"
        )
    return merged
