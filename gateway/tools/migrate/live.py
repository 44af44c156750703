"""The running gateway as the live steps see it: its /status (what it applies now), its /metrics
(what it counted) and its repository API (to apply a config change at once, where allowed).

A step writes config.yaml, then asks for a load through the repository API; a gateway that refuses
it (started without --enable-repository-api) picks the change up on its next repository poll
(--poll-interval). Either way the step waits until /status shows the change, or says which
flag would have let it through.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from gateway.tools.migrate.figures import Snapshot
from gateway.tools.migrate.state import MigrationError

DEFAULT_GATEWAY = "http://127.0.0.1:8000"
DEFAULT_APPLY_TIMEOUT_S = 60.0
POLL_S = 0.1


@dataclass(frozen=True, slots=True)
class Applied:
    """How a config change reached the gateway: through a repository API load, or its poll."""

    how: str  # "repository API" or "polling"
    waited_s: float


class Gateway:
    """A client of one gateway; `headers` are sent with every call (an API key, for one)."""

    def __init__(self, url: str, timeout_s: float = 10.0, headers: dict[str, str] | None = None) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.Client(base_url=self.url, timeout=timeout_s, headers=headers or {})

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, path: str) -> httpx.Response:
        try:
            response = self._client.get(path)
        except httpx.HTTPError as exc:
            raise MigrationError(
                f"the gateway at {self.url} did not answer {path} ({exc}): start it, or give its address "
                "with --gateway"
            ) from exc
        if response.status_code != 200:
            raise MigrationError(
                f"the gateway at {self.url} answered {path} with {response.status_code}: {response.text[:300]}"
            )
        return response

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = self._get("/status").json()
        return data

    def model(self, name: str) -> dict[str, Any] | None:
        """The model's entry of /status, or None when the gateway does not know it."""
        for entry in self.status().get("models", []):
            if entry.get("name") == name:
                return dict(entry)
        return None

    def snapshot(self, *models: str) -> Snapshot:
        return Snapshot.parse(self._get("/metrics").text, time.time(), models)

    def _repository(self, name: str, action: str) -> httpx.Response:
        """POST /v2/repository/models/NAME/ACTION (load or unload), as the gateway answers it."""
        try:
            return self._client.post(f"/v2/repository/models/{name}/{action}", timeout=120.0)
        except httpx.HTTPError as exc:
            raise MigrationError(
                f"the gateway at {self.url} did not answer {'a' if action == 'load' else 'an'} {action} "
                f"of '{name}': {exc}"
            ) from exc

    def load(self, name: str) -> bool:
        """Asks the gateway to (re)read the model's folder now: True if it did, False if its
        repository API is off; other refusals are errors."""
        response = self._repository(name, "load")
        if response.status_code == 200:
            return True
        if response.status_code == 403 and "repository API is disabled" in response.text:
            return False
        raise MigrationError(
            f"the gateway at {self.url} refused to load model '{name}' ({response.status_code}): "
            f"{response.text[:500]}"
        )

    def unload(self, name: str) -> bool:
        """Asks the gateway to unload the model now: True if it did, False if its repository API
        is off (its next poll unloads a model whose folder is gone)."""
        return self._repository(name, "unload").status_code == 200

    def apply(
        self,
        name: str,
        applied: Callable[[dict[str, Any] | None], bool],
        what: str,
        timeout_s: float = DEFAULT_APPLY_TIMEOUT_S,
    ) -> Applied:
        """Gets the gateway to take model `name`'s new config, and waits until `applied` holds for
        its /status entry. `what` says what was changed, for the error on a time-out."""
        started = time.monotonic()
        how = "repository API" if self.load(name) else "polling"
        deadline = started + timeout_s
        while True:
            if applied(self.model(name)):
                return Applied(how, round(time.monotonic() - started, 3))
            if time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
        hint = (
            "the repository API took the load but /status does not show it: read the gateway's log"
            if how == "repository API"
            else "its repository API is off and its repository poll did not pick the change up: start the "
            "gateway with --poll-interval 2 (MODELYARD_POLL_INTERVAL_S) or --enable-repository-api "
            "(MODELYARD_ENABLE_REPOSITORY_API=true), or wait longer with --apply-timeout-s"
        )
        raise MigrationError(
            f"the gateway at {self.url} did not apply {what} of model '{name}' within {timeout_s:g} s: {hint}"
        )


def shadow_applied(deployment: str, percent: float | None) -> Callable[[dict[str, Any] | None], bool]:
    """The model's /status entry shadows `deployment` at `percent` (or not at all, for None)."""

    def check(entry: dict[str, Any] | None) -> bool:
        if entry is None:
            return False
        shares = [
            float(s.get("percent", 0)) for s in entry.get("shadow") or [] if s.get("model") == deployment
        ]
        return shares == ([] if percent is None else [float(percent)])

    return check


def split_applied(deployment: str, percent: float) -> Callable[[dict[str, Any] | None], bool]:
    """The model's /status entry sends `percent` to `deployment` (0: no share at all)."""

    def check(entry: dict[str, Any] | None) -> bool:
        if entry is None:
            return False
        return float((entry.get("split") or {}).get(deployment, 0)) == float(percent)

    return check


def ready(entry: dict[str, Any] | None) -> bool:
    """A model of /status with at least one version ready."""
    return entry is not None and any(v.get("state") == "READY" for v in entry.get("versions", []))
