"""TorchServe: a managed local TorchServe that the gateway starts, supervises and stops, or a
remote one given by its URLs.

Managed mode archives `model.pt` (TorchScript) with torch-model-archiver and the handler in
`modelyard_handler.py`, registers every version through the management API, and keeps
TorchServe's default version in line with the gateway's. Tensors travel in the handler's compact
binary form over one long-lived connection pool per TorchServe.

- `options.py`: the `torchserve:` section of config.yaml;
- `client.py`: the HTTP client of one TorchServe (inference and management APIs);
- `managed.py`: the managed TorchServe's process, its supervision and its registrations;
- `adapter.py`: `TorchServeAdapter`, one model version on either;
- `modelyard_handler.py`: the handler packed into each archive. It runs inside TorchServe's
  workers, so it imports nothing from modelyard, and is imported as a top-level module there.
"""

from __future__ import annotations

from adapters.torchserve.adapter import TorchServeAdapter
from adapters.torchserve.client import TorchServeClient
from adapters.torchserve.options import TorchServeOptions

__all__ = ["TorchServeAdapter", "TorchServeClient", "TorchServeOptions"]
