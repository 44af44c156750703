"""The TorchServe adapter's parts that need no running TorchServe: the tensor wire format, the
config section, and the shipped handler driven through TorchServe's own Context class."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from adapters.base import LoadSpec
from adapters.torchserve import modelyard_handler as wire
from gateway.config import ModelConfig
from gateway.errors import ModelNotReady
from tests.support import ROOT, torchserve_missing


def test_wire_format_round_trips_every_numeric_datatype() -> None:
    rng = np.random.default_rng(5)
    tensors = {
        datatype: (rng.standard_normal((2, 3)) * 50).astype(np.dtype(dtype))
        for datatype, dtype in wire.DTYPES.items()
    }
    header, decoded = wire.decode(wire.encode_tensors("inputs", tensors, {"outputs": ["y"]}), "inputs")
    assert header["outputs"] == ["y"]
    assert [e["datatype"] for e in header["inputs"]] == list(wire.DTYPES)
    for name, array in tensors.items():
        np.testing.assert_array_equal(decoded[name], array)
        assert decoded[name].dtype == array.dtype


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x01", "shorter than its length prefix"),
        (b"\xff\x00\x00\x00{}", "header length past the end"),
        (b"\x02\x00\x00\x00{x", "header is not JSON"),
        (
            wire.encode(
                {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2]}]}, [np.ones(1, np.float32)]
            ),
            "truncated",
        ),
        (
            wire.encode({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1]}]}, []),
            "cannot be carried to torch",
        ),
        (wire.encode({"inputs": []}, [np.ones(1, np.float32)]), "left over"),
    ],
)
def test_wire_format_refuses_malformed_payloads(payload: bytes, message: str) -> None:
    with pytest.raises(wire.TensorFormatError, match=message):
        wire.decode(payload, "inputs")


def spec(config: dict[str, object]) -> LoadSpec:
    return LoadSpec(
        "m", 1, Path("/nonexistent/m/1"), None, ModelConfig.model_validate({"torchserve": config})
    )


def test_unknown_torchserve_key_is_a_clear_load_error() -> None:
    from adapters.torchserve import TorchServeAdapter

    with pytest.raises(
        ModelNotReady,
        match=r"model 'm' version 1: invalid config\.yaml section: torchserve: unknown key 'batchsize'",
    ):
        TorchServeAdapter(spec({"batchsize": 4}))


async def test_remote_needs_an_inference_url_and_its_token_variable() -> None:
    from adapters.torchserve import TorchServeAdapter, TorchServeOptions

    config = ModelConfig.model_validate(
        {"backend": "torchserve", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}],
         "torchserve": {"mode": "remote"}}
    )  # fmt: skip
    with pytest.raises(ModelNotReady, match=r"needs torchserve\.inference_url"):
        await TorchServeAdapter(LoadSpec("m", 1, Path("/nonexistent/m/1"), None, config)).load()
    options = TorchServeOptions(mode="remote", token_env="MODELYARD_TEST_UNSET_VARIABLE")
    with pytest.raises(ModelNotReady, match="MODELYARD_TEST_UNSET_VARIABLE"):
        options.secret(options.token, options.token_env, "model 'm' version 1")


@pytest.mark.skipif(torchserve_missing() is not None, reason=str(torchserve_missing()))
# TorchServe's ts/version.py opens version.txt at import and never closes it: its leak, not ours.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in.*ts/version.txt:pytest.PytestUnraisableExceptionWarning"
)
class TestHandlerInsideTorchServeContext:
    """The handler as TorchServe's worker calls it, with TorchServe's Context and RequestProcessor."""

    @pytest.fixture
    def context(self, tmp_path: Path) -> object:
        from ts.context import Context, RequestProcessor

        shutil.copy(ROOT / "model_repo" / "mlp_torch" / "1" / "model.pt", tmp_path / "model.pt")
        (tmp_path / wire.SETTINGS_FILE).write_text(json.dumps({"inputs": ["input"], "outputs": ["logits"]}))
        manifest = {"model": {"serializedFile": "model.pt", "modelName": "mlp_torch"}}
        context = Context("mlp_torch", str(tmp_path), manifest, 4, None, "0.12.0")
        context.request_processor = [RequestProcessor({}) for _ in range(3)]
        return context

    def test_batch_is_merged_and_split_back_and_one_bad_request_fails_alone(self, context: object) -> None:
        import torch

        handler = wire.ModelyardHandler()
        handler.initialize(context)
        rng = np.random.default_rng(9)
        good = [rng.standard_normal((rows, 64)).astype(np.float32) for rows in (1, 3)]
        bodies = [
            {"body": wire.encode_tensors("inputs", {"input": good[0]})},
            {"body": wire.encode_tensors("inputs", {"input": np.ones((2, 7), np.float32)})},
            {"body": wire.encode_tensors("inputs", {"input": good[1]})},
        ]
        answers = handler.handle(bodies, context)
        module = torch.jit.load(str(ROOT / "model_repo" / "mlp_torch" / "1" / "model.pt"))
        for index, x in ((0, good[0]), (2, good[1])):
            _, outputs = wire.decode(answers[index], "outputs")
            np.testing.assert_allclose(
                outputs["logits"], module(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6
            )
            assert context.get_response_status(index)[0] == 200  # type: ignore[attr-defined]
        header, _ = wire.decode(answers[1], "outputs")
        assert "the model rejected the input" in header["error"]
        assert context.get_response_status(1)[0] == 400  # type: ignore[attr-defined]
