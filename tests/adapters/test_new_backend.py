"""A new backend is one module and one registry line: this module is the module, `register` the line.

The backend below describes itself with the same class attributes as the shipped ones, is
registered with the same call adapters/__init__.py uses for them, and then serves through the
real gateway, found by its artifact name or named in config.yaml, with its section validated by
its own options model, to the real tritonclient over REST and gRPC.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from pydantic import BaseModel, ConfigDict, Field

from adapters import BACKENDS, create_adapter, register
from adapters.base import ModelAdapter
from gateway.errors import ModelNotReady
from gateway.repository import scan_model
from gateway.types import Datatype, ModelSignature, TensorSpec
from tests.support import InProcessGateway


class AffineOptions(BaseModel):
    """The `affine_text:` section of config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scale: float = Field(default=1.0, gt=0)


class AffineTextAdapter(ModelAdapter):
    """y = scale * x + b, with b read from `model.affine.txt`: a backend small enough to read whole."""

    backend: ClassVar[str] = "affine_text"
    artifacts: ClassVar[tuple[str, ...]] = ("model.affine.txt",)
    options_model: ClassVar[type[BaseModel]] = AffineOptions
    aliases: ClassVar[tuple[str, ...]] = ("affine_txt",)

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self._options: AffineOptions = self.read_options(spec)
        self._bias: float | None = None

    async def load(self) -> None:
        if self.spec.artifact is None:
            raise ModelNotReady(f"{self.spec.label}: no model.affine.txt in {self.spec.version_dir}")
        try:
            self._bias = float(self.spec.artifact.read_text())
        except ValueError as exc:
            raise ModelNotReady(f"{self.spec.label}: model.affine.txt holds no number") from exc
        tensor = (-1, -1)
        self._signature = ModelSignature(
            (TensorSpec("x", Datatype.FP32, tensor),),
            (TensorSpec("y", Datatype.FP32, tensor),),
            "affine_text",
        )

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        output_names: Sequence[str],
        *,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        assert self._bias is not None
        return {"y": (inputs["x"] * self._options.scale + self._bias).astype(np.float32)}

    async def ready(self) -> bool:
        return self._bias is not None

    async def aclose(self) -> None:
        self._bias = None


@pytest.fixture
def registered() -> Iterator[None]:
    register(AffineTextAdapter)
    yield
    # The registry is the process's; everything that names backends reads it when it needs it.
    del BACKENDS[AffineTextAdapter.backend]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    for name, config in (
        ("by_artifact", None),
        ("by_config", "backend: affine_text\naffine_text: {scale: 3}\n"),
        ("typo", "backend: affine_text\naffine_text: {scael: 3}\n"),
    ):
        (tmp_path / name / "1").mkdir(parents=True)
        (tmp_path / name / "1" / "model.affine.txt").write_text("0.5")
        if config:
            (tmp_path / name / "config.yaml").write_text(config)
    return tmp_path


def test_unregistered_it_is_unknown(repo: Path) -> None:
    assert "affine_text" not in BACKENDS
    assert not scan_model(repo, "by_config").ok
    assert "no model artifact" in " ".join(scan_model(repo, "by_artifact").problems)


@pytest.mark.usefixtures("registered")
def test_a_registered_backend_serves_through_the_gateway(repo: Path) -> None:
    assert scan_model(repo, "by_artifact").backend == "affine_text"
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    with InProcessGateway(repo, create_adapter) as gateway:
        rest = triton_http.InferenceServerClient(gateway.http)
        grpc_client = triton_grpc.InferenceServerClient(gateway.grpc)
        for client, module in ((rest, triton_http), (grpc_client, triton_grpc)):
            for model, scale in (("by_artifact", 1.0), ("by_config", 3.0)):
                tensor = module.InferInput("x", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                got = client.infer(model, [tensor]).as_numpy("y")
                np.testing.assert_array_equal(got, x * scale + 0.5)
        assert rest.get_model_metadata("by_config")["platform"] == "affine_text"
        rest.close()
        grpc_client.close()
        index = {m["name"]: m for m in httpx.post(f"http://{gateway.http}/v2/repository/index").json()}
    assert index["typo"]["state"] == "UNAVAILABLE"
    assert (
        "invalid config.yaml section: affine_text: unknown key 'scael' (did you mean 'scale'?)"
        in index["typo"]["reason"]
    )


def test_a_name_or_artifact_of_another_backend_is_refused() -> None:
    class Clash(AffineTextAdapter):
        backend: ClassVar[str] = "clash"
        artifacts: ClassVar[tuple[str, ...]] = ("model.onnx",)

    with pytest.raises(ValueError, match=r"artifact 'model\.onnx' of Clash is OnnxRuntimeAdapter's"):
        register(Clash)
    Clash.artifacts, Clash.aliases = (), ("onnx",)
    with pytest.raises(ValueError, match="backend name 'onnx' of Clash is taken by OnnxRuntimeAdapter"):
        register(Clash)
    assert "clash" not in BACKENDS
