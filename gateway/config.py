"""The schema of a model's optional `config.yaml`.

The backends' names and their sections come from the one registry of backends (adapters/), which
imports this module: it is read when a config is validated, not when this module is imported.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.types import Datatype, TensorSpec

# What a model (a folder of the repository) may be called.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VersionPolicy(_Strict):
    """Which numeric version folders load, as in Triton: the latest N, a specific list, or all."""

    latest: int | None = Field(default=None, ge=1)
    specific: tuple[int, ...] | None = None
    all: bool = False

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, value: Any) -> Any:
        if value == "all":
            return {"all": True}
        if isinstance(value, dict) and "all" in value and value["all"] in ({}, None):
            return {**value, "all": True}
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> VersionPolicy:
        chosen = sum([self.latest is not None, self.specific is not None, self.all])
        if chosen > 1:
            raise ValueError("give one of latest, specific or all")
        return self

    def select(self, available: list[int]) -> list[int]:
        ordered = sorted(available)
        if self.all:
            return ordered
        if self.specific is not None:
            return [v for v in ordered if v in self.specific]
        return ordered[-(self.latest or 1) :]


class TensorDecl(_Strict):
    name: str
    datatype: Datatype
    shape: tuple[int, ...]

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < -1 for d in shape):
            raise ValueError("dimensions are -1 (any size) or non-negative")
        return shape

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.datatype, self.shape)


class Batching(_Strict):
    """Dynamic batching in the gateway; off while max_batch_size is 0."""

    max_batch_size: int = Field(default=0, ge=0)
    max_queue_delay_us: int = Field(default=0, ge=0)
    preferred_batch_sizes: tuple[int, ...] = ()
    # Batches running at once: more than one keeps several cores busy while the next batch fills.
    max_concurrent_batches: int = Field(default=2, ge=1)


class CanaryRule(_Strict):
    """Requests whose header matches go to a given version or label."""

    header: str
    # The header's value that matches; without one, any value does.
    equals: str | None = None
    version: int | None = None
    label: str | None = None

    @model_validator(mode="after")
    def _one_target(self) -> CanaryRule:
        if (self.version is None) == (self.label is None):
            raise ValueError("a canary rule names one of version or label")
        return self


class Routing(_Strict):
    """How requests that name no version find one, beyond labels and traffic weights."""

    # A request may name a label in this header (or in its `label` parameter).
    label_header: str = "x-model-label"
    # With traffic weights, the same value of this header always gets the same version.
    sticky_header: str | None = None
    canary: tuple[CanaryRule, ...] = ()


class ShadowTarget(_Strict):
    """A copy of live traffic sent, after the client has its answer, to another version or model."""

    # Another model of the repository (another deployment of this one), or this model when absent.
    model: str | None = None
    # A version number or label there; its default routing when absent.
    version: str | None = None
    percent: float = Field(default=100.0, gt=0, le=100)
    # Outputs further apart than this (absolute, or relative to the primary's) count as a mismatch.
    atol: float = Field(default=1e-5, ge=0)
    rtol: float = Field(default=1e-4, ge=0)

    @field_validator("version", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value


class CacheConfig(_Strict):
    """A version's answers kept by the bytes of their inputs (gateway/cache.py): opt-in, per model."""

    max_entries: int = Field(default=1024, ge=1)
    max_bytes: int = Field(default=64 * 2**20, ge=1)
    # Seconds an answer is kept; none: until it is the least recently used one, or the version unloads.
    ttl_s: float | None = Field(default=None, gt=0)


class Record(_Strict):
    """A sampled share of the model's answered requests whose inputs the gateway keeps, one .npz
    each, under its own record folder (`--record-dir`), so a parity check can run on what users
    send (gateway/recording.py). Recording stops, counted, once either cap is reached."""

    # The share of answered requests recorded, 0 to 1.
    sample: float = Field(default=0.01, gt=0, le=1)
    max_requests: int = Field(default=1000, ge=1, le=1_000_000)
    max_bytes: int = Field(default=64 * 2**20, ge=1024)


class Limits(_Strict):
    max_inflight: int = Field(default=64, ge=1)
    max_queue: int = Field(default=256, ge=0)
    timeout_ms: int | None = Field(default=None, ge=1)


def backend_names() -> Mapping[str, Any]:
    """The registered backends, by name."""
    from adapters import BACKENDS  # the registry imports this module: read on use, not at import

    return BACKENDS


LoadMode = Literal["eager", "on_demand"]


class Warmup(_Strict):
    """Requests run when a version loads (and every time it loads again), before it turns ready:
    the inputs of .npz files in the model's folder, or inputs generated from its signature."""

    # Files beside config.yaml, each one request's inputs keyed by input name; none: generated.
    samples: tuple[str, ...] = ()
    # How many times each request runs.
    runs: int = Field(default=1, ge=1, le=1000)
    # Rows of generated inputs: the size of every -1 dimension.
    batch: int = Field(default=1, ge=1, le=4096)

    @field_validator("samples", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("samples")
    @classmethod
    def _inside_the_model(cls, samples: tuple[str, ...]) -> tuple[str, ...]:
        for name in samples:
            path = PurePosixPath(name)
            if path.is_absolute() or ".." in path.parts or path.suffix != ".npz":
                raise ValueError(f"warmup sample {name!r} must be an .npz file inside the model's folder")
        return samples


class PayloadLog(_Strict):
    """A sampled share of the model's requests and responses, written as CloudEvents (the format
    KServe's logger uses) to an HTTP sink and/or a JSONL file (gateway/payload_log.py)."""

    # The share of requests logged, 0 to 1; each request is drawn once, for both its events.
    sample: float = Field(default=1.0, ge=0, le=1)
    # all: requests and responses; request or response: only those.
    mode: Literal["all", "request", "response"] = "all"
    # An http(s) URL each event is POSTed to, in CloudEvents' binary mode (ce-* headers).
    sink: str | None = None
    # A JSONL file each event is appended to, one structured-mode CloudEvent a line; a relative
    # path is the gateway's working directory's.
    path: Path | None = None
    # The file rotates (path.1, path.2...) when the next line would take it past this size.
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # Rotated files kept beside the current one.
    backups: int = Field(default=3, ge=0, le=100)
    # A tensor whose data is larger is written as its shape, datatype, size and sha256.
    max_tensor_bytes: int = Field(default=64 * 1024, ge=0)
    # Input and output names whose data is never written (their shape and datatype are).
    redact: tuple[str, ...] = ()
    # The events' ce-source.
    source: str = Field(default="modelyard", min_length=1)
    # Events waiting for the sinks; one that finds the queue full is dropped and counted.
    queue: int = Field(default=1000, ge=1)
    # The most seconds one POST to the sink may take; past it the event is dropped and counted.
    timeout_s: float = Field(default=2.0, gt=0)

    @model_validator(mode="after")
    def _a_sink(self) -> PayloadLog:
        if self.sink is None and self.path is None:
            raise ValueError("payload_log needs a sink (an http(s) URL), a path (a JSONL file), or both")
        if self.sink is not None and not self.sink.startswith(("http://", "https://")):
            raise ValueError(f"payload_log.sink must be an http:// or https:// URL, not {self.sink!r}")
        return self


class ModelConfig(_Strict):
    backend: str | None = None
    # eager: loaded at start; on_demand: at its first request. None: the gateway's --load-mode.
    load: LoadMode | None = None
    warmup: Warmup | None = None
    version_policy: VersionPolicy = VersionPolicy(latest=1)
    labels: dict[str, int] = Field(default_factory=dict)
    traffic: dict[int, float] = Field(default_factory=dict)
    inputs: tuple[TensorDecl, ...] | None = None
    outputs: tuple[TensorDecl, ...] | None = None
    batching: Batching = Batching()
    limits: Limits = Limits()
    cache: CacheConfig | None = None
    routing: Routing = Routing()
    shadow: tuple[ShadowTarget, ...] = ()
    # Requests and responses logged as CloudEvents; None: none are.
    payload_log: PayloadLog | None = None
    # Other models of the repository (deployments of this one, in order) that answer a request
    # naming no version when this model is not ready or its backend is down.
    fallback: tuple[str, ...] = ()
    # Other models of the repository (deployments of this one), each with the percent of this
    # model's requests it answers instead: those that name no version or label and match no
    # canary rule. The answer keeps this model's name. `modelyard migrate promote` writes it.
    split: dict[str, float] = Field(default_factory=dict)
    # The inputs of a sampled share of answered requests, kept for parity checks; None: none are.
    record: Record | None = None
    # The model of the repository this one is another deployment of (same weights, other backend):
    # `modelyard bench MODEL --deployments onnx,torchserve,tensorflow` finds MODEL's twins by it.
    twin_of: str | None = None
    # Each backend's own section, written under the backend's name (`tensorflow: {...}`), as given:
    # the backend's options model validates it when the repository is scanned and at load.
    sections: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _gather_sections(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        if "sections" in value:
            raise ValueError(
                "'sections' is not a config.yaml key: write each backend's section under its name"
            )
        names = backend_names()
        sections = {key: section or {} for key, section in value.items() if key in names}
        rest = {key: item for key, item in value.items() if key not in names}
        return {**rest, "sections": sections} if sections else rest

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, backend: str | None) -> str | None:
        names = backend_names()
        if backend is not None and backend not in names:
            raise ValueError(f"unknown backend '{backend}'; known: {', '.join(sorted(names))}")
        return backend

    def section(self, backend: str) -> Mapping[str, Any]:
        """The backend's section as written; empty when config.yaml has none."""
        return self.sections.get(backend, {})

    @field_validator("labels")
    @classmethod
    def _label_names(cls, labels: dict[str, int]) -> dict[str, int]:
        for label in labels:
            if label.isdigit() or not label:
                raise ValueError(f"label {label!r} must be a non-numeric name")
        return labels

    @field_validator("traffic")
    @classmethod
    def _weights(cls, traffic: dict[int, float]) -> dict[int, float]:
        if any(w < 0 for w in traffic.values()):
            raise ValueError("traffic weights must be non-negative")
        if traffic and sum(traffic.values()) <= 0:
            raise ValueError("traffic weights must not all be zero")
        return traffic

    @field_validator("split")
    @classmethod
    def _shares(cls, split: dict[str, float]) -> dict[str, float]:
        for name, percent in split.items():
            if not MODEL_NAME.match(name):
                raise ValueError(f"split names {name!r}, which is not a model name")
            if not 0 <= percent <= 100:
                raise ValueError(f"split percent for '{name}' must be between 0 and 100, not {percent}")
        if sum(split.values()) > 100:
            raise ValueError(f"split percents add up to {sum(split.values()):g}, more than 100")
        return split


# Config keys that only steer requests: a change to them alone applies to the loaded model in
# place, without loading its versions again.
ROUTING_KEYS = frozenset({"traffic", "labels", "routing", "shadow", "fallback", "split", "twin_of", "record"})

# Labels that name the default version, in this order, when the config has no traffic split.
DEFAULT_LABELS = ("default", "stable")


def preferred_version(config: ModelConfig, versions: list[int]) -> int | None:
    """The one version that stands for the model when no draw is made: for metadata, and for
    backends that keep a default of their own. The heaviest traffic weight, else the default or
    stable label, else the highest version."""
    weighted = {v: w for v, w in config.traffic.items() if v in versions and w > 0}
    if weighted:
        return max(sorted(weighted), key=lambda v: weighted[v])
    for label in DEFAULT_LABELS:
        if config.labels.get(label) in versions:
            return config.labels[label]
    return max(versions) if versions else None


class ConfigError(ValueError):
    """A config.yaml that cannot be read or does not fit the schema."""


# Sections of settings: an override's section changes the keys it names and keeps the others.
# Every other key (a version policy, the labels, the tensors) is replaced whole.
MERGED_SECTIONS = frozenset(
    {"batching", "limits", "routing", "warmup", "onnxruntime", "torchserve", "tfserving", "tensorflow"}
    | {"litert", "keras", "v2"}
)


def merge_override(raw: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """config.yaml's mapping with an override's keys laid over it."""
    merged = dict(raw)
    for key, value in override.items():
        below = merged.get(key)
        if key in MERGED_SECTIONS and isinstance(below, dict) and isinstance(value, Mapping):
            merged[key] = {**below, **value}
        else:
            merged[key] = value
    return merged


def load_model_config(path: Path, override: Mapping[str, Any] | None = None) -> ModelConfig:
    """The model's config.yaml (absent: all defaults), with `override`'s keys laid over it."""
    # Named from the repository down (`mlp/config.yaml`): messages reach clients, and a server's
    # folders are none of theirs.
    where = f"{path.parent.name}/{path.name}"
    try:
        raw = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: cannot read YAML: {_yaml_problem(exc)}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    if override:
        raw = merge_override(raw, override)
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {validation_problems(exc, ModelConfig)}") from exc


def validation_problems(exc: ValidationError, model: type[BaseModel], prefix: tuple[str, ...] = ()) -> str:
    """`exc`'s errors as one line, each at its key's dotted path (under `prefix`); an unknown key
    says so and names the nearest known key of its section, where one is close."""
    problems = []
    for err in exc.errors():
        loc = tuple(str(part) for part in err["loc"])
        where = ".".join((*prefix, *loc)) or "(top)"
        if err["type"] == "extra_forbidden" and loc:
            known = _keys_at(model, loc[:-1])
            close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            section = ".".join((*prefix, *loc[:-1]))
            problems.append(f"{section + ': ' if section else ''}unknown key '{loc[-1]}'{hint}")
        else:
            problems.append(f"{where}: {err['msg']}")
    return "; ".join(problems)


def _keys_at(model: type[BaseModel], path: tuple[str, ...]) -> list[str]:
    """The keys (aliases where set) of the section at `path` inside `model`; none where the path
    leaves the nested models (a list index, a mapping's key)."""
    current: type[BaseModel] | None = model
    for part in path:
        if current is None or part not in current.model_fields:
            return []
        current = _nested_model(current.model_fields[part].annotation)
    if current is None:
        return []
    return [info.alias or name for name, info in current.model_fields.items()]


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The parser's complaint and where, without its dump of the text around it."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(exc).splitlines()[0]
