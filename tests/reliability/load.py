"""Steady client load for the reliability tests: threads that keep calling one model over REST
and record every outcome, checking each answer against numpy's."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import numpy as np

from scripts.build_models import affine_weights

X = np.arange(8, dtype=np.float32).reshape(2, 4) / 8


def affine_body() -> dict[str, object]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": X.ravel().tolist()}]}


def affine_answer_ok(answer: dict[str, object]) -> bool:
    weight, bias = affine_weights(1)
    (output,) = answer["outputs"]  # type: ignore[misc]
    got = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    return bool(np.allclose(got, X @ weight + bias, rtol=1e-5, atol=1e-6))


@dataclass
class Outcome:
    started: float
    ended: float
    status: int | str  # an HTTP status, or the name of the transport error
    correct: bool = False


@dataclass
class SteadyLoad:
    """`clients` threads, each sending one request after another until stopped."""

    url: str
    body: dict[str, object] = field(default_factory=affine_body)
    check: Callable[[dict[str, object]], bool] = affine_answer_ok
    clients: int = 2
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 30.0
    # Stop a client after its first answer of this status (a client that sees the gateway refuse).
    stop_on: int | None = None
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s + 5)
        assert not any(t.is_alive() for t in self._threads), "a client is still waiting: a request hangs"

    def counts(self) -> Counter[int | str]:
        with self._lock:
            return Counter(o.status for o in self.outcomes)

    def wrong_answers(self) -> int:
        with self._lock:
            return sum(1 for o in self.outcomes if o.status == 200 and not o.correct)

    def _client(self) -> None:
        # A new connection per request, as many clients do: a request the server never took
        # fails to connect, and cannot be confused with one it took and lost.
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(timeout=self.timeout_s, limits=limits, headers=self.headers) as http:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = http.post(self.url, json=self.body)
                except httpx.TransportError as exc:
                    outcome = Outcome(started, time.monotonic(), type(exc).__name__)
                else:
                    correct = response.status_code == 200 and self.check(response.json())
                    outcome = Outcome(started, time.monotonic(), response.status_code, correct)
                with self._lock:
                    self.outcomes.append(outcome)
                if outcome.status == self.stop_on or isinstance(outcome.status, str):
                    return
