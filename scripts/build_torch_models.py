"""Build the TorchScript examples in model_repo/ for the TorchServe backend.

    python scripts/build_torch_models.py [--repo model_repo]

`mlp_torch` version 1 is one torch module loaded with the same fixed weights as the ONNX `mlp`
example (scripts/build_models.py), so the two deployments of one model can be compared; version
2 has other weights. Needs torch (`pip install torch==2.13.0`).
"""

from __future__ import annotations

import argparse
import itertools
import warnings
from pathlib import Path

import numpy as np
import torch

from scripts.build_models import mlp_weights

MLP_SIZES = (64, 256, 256, 10)
MLP_SEEDS = {1: 7, 2: 8}  # version 1 shares seed 7 with model_repo/mlp

MLP_TORCH_CONFIG = """\
# The ONNX `mlp` example's module as TorchScript, served by a TorchServe the gateway manages.
backend: torchserve
twin_of: mlp
version_policy: all
labels: {stable: 1, canary: 2}
inputs:  [{name: input, datatype: FP32, shape: [-1, 64]}]
outputs: [{name: logits, datatype: FP32, shape: [-1, 10]}]
torchserve: {mode: managed, batch_size: 8, max_batch_delay_ms: 2, workers: 1, threads: 1}
"""


class MLP(torch.nn.Module):
    def __init__(self, sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(fan_in, fan_out) for fan_in, fan_out in itertools.pairwise(sizes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def mlp_module(seed: int, sizes: tuple[int, ...] = MLP_SIZES) -> MLP:
    """The module with scripts/build_models.py's weights: (fan_in, fan_out) matrices, zero biases."""
    module = MLP(sizes).eval()
    with torch.no_grad():
        for layer, (weight, bias) in zip(module.layers, mlp_weights(sizes, seed), strict=True):
            layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight.T)))
            layer.bias.copy_(torch.from_numpy(bias))
    return module


def save_torchscript(module: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # torch 2.13 deprecates TorchScript tracing in favour of torch.export, but TorchScript is the
    # artifact TorchServe's model.pt path loads: keep it, without the warning.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning
        )
        traced = torch.jit.trace(module, example)
    traced.save(str(path))


def build_repository(repo: Path) -> list[Path]:
    written = []
    example = torch.zeros(1, MLP_SIZES[0])
    for version, seed in MLP_SEEDS.items():
        path = repo / "mlp_torch" / str(version) / "model.pt"
        save_torchscript(mlp_module(seed), example, path)
        written.append(path)
    (repo / "mlp_torch" / "config.yaml").write_text(MLP_TORCH_CONFIG)
    written.append(repo / "mlp_torch" / "config.yaml")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent / "model_repo")
    for path in build_repository(parser.parse_args().repo):
        print(path)


if __name__ == "__main__":
    main()
