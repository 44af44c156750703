"""Picks the version that serves a request: a number, a label, or the model's default."""

from __future__ import annotations

import random

from gateway.config import DEFAULT_LABELS
from gateway.errors import ModelNotFound, ModelNotReady
from gateway.registry import LoadedModel, LoadedVersion


class Router:
    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(self, model: LoadedModel, requested: str | None) -> LoadedVersion:
        """The version for `requested`: a version number, a label, or None/"" for the default."""
        if model.reason and not model.versions:
            raise ModelNotReady(f"model '{model.name}' is not ready: {model.reason}")
        if requested:
            return self._ready(model, self.resolve(model, requested))
        return self._ready(model, self.default_version(model))

    def default_version(self, model: LoadedModel) -> int:
        ready = model.ready_versions
        if not ready:
            raise ModelNotReady(f"model '{model.name}' has no ready version: {model.reason or 'none loaded'}")
        config = model.entry.config
        weighted = [(v, w) for v, w in config.traffic.items() if v in ready and w > 0]
        if weighted:
            versions, weights = zip(*weighted, strict=True)
            chosen: int = self._rng.choices(versions, weights)[0]
            return chosen
        for label in DEFAULT_LABELS:
            if config.labels.get(label) in ready:
                return config.labels[label]
        return ready[-1]

    @staticmethod
    def resolve(model: LoadedModel, requested: str) -> int:
        """The version number that `requested` (a number or a label) names, ready or not."""
        if requested.isdigit():
            version = int(requested)
            if version not in model.versions:
                loaded = ", ".join(str(v) for v in sorted(model.versions)) or "none"
                raise ModelNotFound(f"model '{model.name}' has no version {version} (loaded: {loaded})")
            return version
        labels = model.entry.config.labels
        if requested not in labels:
            known = ", ".join(sorted(labels)) or "none"
            raise ModelNotFound(
                f"model '{model.name}' has no version or label '{requested}' (labels: {known})"
            )
        return labels[requested]

    @staticmethod
    def _ready(model: LoadedModel, version: int) -> LoadedVersion:
        loaded = model.versions.get(version)
        if loaded is None:
            raise ModelNotFound(f"model '{model.name}' has no version {version}")
        if not loaded.ready:
            reason = f": {loaded.reason}" if loaded.reason else ""
            raise ModelNotReady(
                f"model '{model.name}' version {version} is not ready ({loaded.state}){reason}"
            )
        return loaded
