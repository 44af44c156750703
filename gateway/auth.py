"""Who may do what: API keys (or bearer tokens), each scoped to a set of models and actions.

The one place the gateway decides access. REST calls `Authorizer.check` from one app-wide
dependency, gRPC from its one interceptor, each with the raw credentials header, the action and
the model name. Keys are kept only as SHA-256 digests, compared in constant time, and never
logged: messages name a key by its `name`, never by its value.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.errors import PermissionDenied, Unauthenticated

if TYPE_CHECKING:
    from gateway.settings import Settings

# What a key can be allowed to do. `health` and `metrics` are for the open-by-config endpoints;
# `admin` is no route's action: it lets a key see the gateway's process details (pid, memory) in
# the aggregates that show them.
Action = Literal["infer", "metadata", "repository", "health", "metrics"]
KEY_ACTIONS: tuple[str, ...] = ("infer", "metadata", "repository")
ADMIN = "admin"
ALL_MODELS = "*"
_BEARER = "bearer "


class KeyEntry(BaseModel):
    """One key as written in the keys file or MODELYARD_API_KEYS."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    key: str | None = Field(default=None, min_length=16, repr=False)
    key_env: str | None = None
    models: list[str] = Field(min_length=1)
    actions: list[Literal["infer", "metadata", "repository", "admin"]] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> KeyEntry:
        if (self.key is None) == (self.key_env is None):
            raise ValueError(f"key '{self.name}': give exactly one of 'key' or 'key_env'")
        return self


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry] = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    digest: bytes
    models: frozenset[str]
    actions: frozenset[str]

    @property
    def access(self) -> Access:
        return Access(None if ALL_MODELS in self.models else self.models, ADMIN in self.actions)

    def allows(self, action: str, model: str | None) -> bool:
        if action not in self.actions:
            return False
        return model is None or ALL_MODELS in self.models or model in self.models


@dataclass(frozen=True, slots=True)
class Access:
    """What one request may see of the routes that report on many models (statistics, the
    repository index, /status and the status page, /metrics): which models, and whether the
    gateway's process details."""

    models: frozenset[str] | None  # None: every model
    admin: bool

    def sees(self, model: str) -> bool:
        return self.models is None or model in self.models

    @property
    def everything(self) -> bool:
        return self.models is None and self.admin


# With auth off, or on an endpoint open by configuration, a request sees everything.
FULL_ACCESS = Access(None, True)
# Set by the one REST access check and the one gRPC interceptor for the request they let through;
# read by the aggregate routes. Each request runs in its own task, so each has its own value.
request_access: ContextVar[Access] = ContextVar("request_access", default=FULL_ACCESS)


def _digest(secret: str | bytes) -> bytes:
    return hashlib.sha256(secret.encode("utf-8") if isinstance(secret, str) else secret).digest()


def token_from_header(value: str | bytes | None) -> bytes | None:
    """The key in an `Authorization: Bearer <key>` or `X-API-Key: <key>` header value."""
    if value is None:
        return None
    raw = value.encode("utf-8") if isinstance(value, str) else value
    raw = raw.strip()
    if raw[: len(_BEARER)].lower() == _BEARER.encode():
        raw = raw[len(_BEARER) :].strip()
    return raw or None


class Authorizer:
    """Decides each request from (credentials, action, model); a no-op when no keys are given."""

    def __init__(self, keys: Sequence[ApiKey] = (), open_actions: Iterable[str] = ()) -> None:
        self._keys = tuple(keys)
        self.open_actions = frozenset(open_actions)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, credentials: str | bytes | None, action: str, model: str | None) -> Access:
        """What the request may see, if it may go on; raises Unauthenticated (401) or
        PermissionDenied (403).

        `credentials` is the raw value of the Authorization or X-API-Key header (or gRPC metadata).
        """
        if not self._keys or action in self.open_actions:
            return FULL_ACCESS
        token = token_from_header(credentials)
        if token is None:
            raise Unauthenticated(
                "this gateway needs an API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
            )
        key = self._match(token)
        if key is None:
            raise Unauthenticated("the API key is not valid")
        # Health and metrics, where not open, take any valid key: they concern no model.
        if action in KEY_ACTIONS and not key.allows(action, model):
            target = f"model '{model}'" if model is not None else "this server"
            raise PermissionDenied(f"API key '{key.name}' may not {action} on {target}")
        return key.access

    def _match(self, token: bytes) -> ApiKey | None:
        # Every key is compared, each in constant time, so the time taken says nothing about
        # which key (if any) came close.
        digest = _digest(token)
        found = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found

    @classmethod
    def from_settings(cls, settings: Settings) -> Authorizer:
        entries: list[KeyEntry] = []
        if settings.api_keys_file is not None:
            entries += _parse(_read_file(settings.api_keys_file), str(settings.api_keys_file))
        if settings.api_keys is not None:
            entries += _parse(_read_env(settings.api_keys.get_secret_value()), "MODELYARD_API_KEYS")
        names = [e.name for e in entries]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"API key names must be unique; repeated: {', '.join(duplicates)}")
        open_actions = [
            action
            for action, is_open in (
                ("health", settings.auth_open_health),
                ("metrics", settings.auth_open_metrics),
            )
            if is_open
        ]
        return cls([_key(e) for e in entries], open_actions)


def _read_file(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read the API keys file {path}: {exc}") from None


def _read_env(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ValueError("MODELYARD_API_KEYS is not valid JSON") from None


def _parse(data: Any, source: str) -> list[KeyEntry]:
    if isinstance(data, list):
        data = {"keys": data}
    try:
        return KeysFile.model_validate(data).keys
    except ValidationError as exc:
        # pydantic would quote the input, key values included: name only where and what.
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"API keys in {source}: {problems}") from None


def _key(entry: KeyEntry) -> ApiKey:
    secret = entry.key
    if entry.key_env is not None:
        secret = os.environ.get(entry.key_env)
        if not secret or len(secret) < 16:
            raise ValueError(
                f"API key '{entry.name}': environment variable {entry.key_env} is unset or under 16 characters"
            )
    assert secret is not None
    return ApiKey(entry.name, _digest(secret), frozenset(entry.models), frozenset(entry.actions))
