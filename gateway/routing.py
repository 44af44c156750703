"""Picks the version that serves a request.

In order: the version or label the request names (in the URL or `model_version`, then in the
`label` parameter or the model's label header); then the first canary rule whose header matches;
then the traffic split, sticky by a header's hash where configured; then the default or stable
label; then the highest ready version. Before all that, a model whose config has a `split` sends
its share of the requests that name nothing and match no canary rule to another deployment (a
model of the repository), which then routes them by its own config. Headers reach the router as the request context's routing
keys, names in lower case.

A version that loads on demand (or was unloaded to make room) counts as ready here: the data plane
waits for its load. Error texts begin as Triton's do, which clients look for.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.config import DEFAULT_LABELS, CanaryRule, Routing
from gateway.errors import ModelNotFound, ModelNotReady
from gateway.loaded import LoadedModel, LoadedVersion
from gateway.types import ModelSignature

_NO_KEYS: Mapping[str, str] = {}


@dataclass(slots=True)
class Route:
    """Where one request runs: its model and the ready version routing chose, chosen once (not a
    frozen dataclass, for the same reason as RequestContext)."""

    model: LoadedModel
    loaded: LoadedVersion

    @property
    def signature(self) -> ModelSignature:
        assert self.loaded.signature is not None
        return self.loaded.signature

    @property
    def label(self) -> str:
        return f"model '{self.model.name}' version {self.loaded.version}"


class Router:
    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(
        self,
        model: LoadedModel,
        requested: str | None,
        routing_keys: Mapping[str, str] | None = None,
        label: str | None = None,
    ) -> LoadedVersion:
        """The version for `requested` (a version number, a label, or None/"" for the default),
        with the request's routing keys and `label` parameter for the rules that read them."""
        if model.reason and not model.versions:
            raise ModelNotReady(
                f"Request for unknown model: '{model.name}' has no available versions: {model.reason}"
            )
        routing = model.entry.config.routing
        headers = routing_keys or _NO_KEYS
        named = requested or label or headers.get(routing.label_header.lower())
        if named:
            return self._ready(model, self.resolve(model, named))
        rule = _matching_canary(routing, headers)
        if rule is not None:
            target = rule.version if rule.version is not None else self.resolve(model, str(rule.label))
            return self._ready(model, target)
        sticky = headers.get(routing.sticky_header.lower()) if routing.sticky_header else None
        return self._ready(model, self.default_version(model, sticky))

    def split_target(
        self,
        model: LoadedModel,
        requested: str | None,
        routing_keys: Mapping[str, str] | None = None,
        label: str | None = None,
    ) -> str | None:
        """The other deployment the model's `split` draws for this request, or None: it stays.
        Only requests that name no version or label and match no canary rule are drawn."""
        split = model.entry.config.split
        if not split or requested or label:
            return None
        routing = model.entry.config.routing
        headers = routing_keys or _NO_KEYS
        if headers.get(routing.label_header.lower()) or _matching_canary(routing, headers):
            return None
        sticky = headers.get(routing.sticky_header.lower()) if routing.sticky_header else None
        # Its own draw (salted apart from the version draw): a sticky key keeps one deployment.
        point = self._draw(f"{model.name}\0split", sticky) * 100
        for deployment, percent in split.items():
            point -= percent
            if point < 0:
                return deployment
        return None

    def default_version(self, model: LoadedModel, sticky_key: str | None = None) -> int:
        ready = model.servable_versions
        if not ready:
            reason = f": {model.reason}" if model.reason else ""
            raise ModelNotReady(
                f"Request for unknown model: '{model.name}' has no available versions{reason}"
            )
        config = model.entry.config
        weighted = [(v, w) for v, w in sorted(config.traffic.items()) if v in ready and w > 0]
        if weighted:
            return _weighted_choice(weighted, self._draw(model.name, sticky_key))
        for label in DEFAULT_LABELS:
            if config.labels.get(label) in ready:
                return config.labels[label]
        return ready[-1]

    def _draw(self, model_name: str, sticky_key: str | None) -> float:
        """A number in [0, 1): random, or fixed by the sticky key so one key keeps one version."""
        if sticky_key is None:
            return self._rng.random()
        digest = hashlib.sha256(f"{model_name}\0{sticky_key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    @staticmethod
    def resolve(model: LoadedModel, requested: str) -> int:
        """The version number that `requested` (a number or a label) names, ready or not."""
        if requested.isdigit():
            version = int(requested)
            if version not in model.versions:
                known = ", ".join(str(v) for v in sorted(model.versions)) or "none"
                raise ModelNotFound(
                    f"Request for unknown model: '{model.name}' version {version} is not found (versions: {known})"
                )
            return version
        labels = model.entry.config.labels
        if requested not in labels:
            known = ", ".join(sorted(labels)) or "none"
            raise ModelNotFound(
                f"Request for unknown model: '{model.name}' has no version or label '{requested}' (labels: {known})"
            )
        return labels[requested]

    @staticmethod
    def _ready(model: LoadedModel, version: int) -> LoadedVersion:
        loaded = model.versions.get(version)
        if loaded is None:
            raise ModelNotFound(f"Request for unknown model: '{model.name}' version {version} is not found")
        if not (loaded.ready or loaded.loadable):
            reason = f": {loaded.reason}" if loaded.reason else ""
            raise ModelNotReady(
                f"Request for unknown model: '{model.name}' version {version} is not at ready state "
                f"({loaded.state}){reason}"
            )
        return loaded


def _matching_canary(routing: Routing, headers: Mapping[str, str]) -> CanaryRule | None:
    for rule in routing.canary:
        value = headers.get(rule.header.lower())
        if value is not None and (rule.equals is None or value == rule.equals):
            return rule
    return None


def _weighted_choice(weighted: list[tuple[int, float]], draw: float) -> int:
    total = sum(w for _, w in weighted)
    point = draw * total
    for version, weight in weighted:
        point -= weight
        if point < 0:
            return version
    return weighted[-1][0]
