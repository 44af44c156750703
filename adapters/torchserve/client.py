"""The HTTP client of one TorchServe: its inference API on aiohttp, its management API on httpx."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from typing import Any

import aiohttp
import httpx

from adapters.base import SharedResources
from adapters.torchserve import modelyard_handler as wire
from adapters.torchserve.options import TorchServeOptions
from gateway.errors import (
    BackendError,
    BackendUnavailable,
    ConnectionRefused,
    DeadlineExceeded,
    remote_http_error,
)
from gateway.tracing import trace_headers

# aiohttp writes a bytes body in one piece, and warns above this size; a file-like body goes in
# chunks, so the event loop is not held and a server that answers early (TorchServe's 413) leaves
# no transport stuck behind a body it will never read.
_CHUNKED_ABOVE = 1 << 20


def _payload(body: bytes) -> bytes | io.BytesIO:
    return io.BytesIO(body) if len(body) > _CHUNKED_ABOVE else body


def error_message(content: bytes) -> str:
    """The reason in a TorchServe error body: its JSON `message`, or the handler's `error` header."""
    text = content[:300].decode(errors="replace")
    try:
        body = json.loads(content)
    except ValueError:
        try:
            header, _ = wire.decode(content, "outputs")
            return str(header.get("error", text))
        except wire.TensorFormatError:
            return text
    return str(body.get("message", body)) if isinstance(body, dict) else str(body)


class TorchServeClient:
    """One long-lived connection pool to one TorchServe's inference API, one to its management API.

    Inference goes through aiohttp: measured against httpx on the same requests, its client costs
    about a sixth of the CPU per request, and on the hot path that CPU is the gateway's. Management
    calls are rare and stay on httpx.
    """

    def __init__(
        self,
        inference_url: str,
        management_url: str | None,
        token: str | None,
        management_token: str | None,
        timeout_s: float,
    ) -> None:
        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/") if management_url else None
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.inference = aiohttp.ClientSession(
            base_url=self.inference_url,
            headers=auth,
            connector=aiohttp.TCPConnector(limit=256),
            timeout=self._timeout,
        )
        management_auth = {"Authorization": f"Bearer {management_token}"} if management_token else {}
        self.management = httpx.AsyncClient(
            base_url=self.management_url or self.inference_url, headers=management_auth, timeout=timeout_s
        )

    async def healthy(self) -> bool:
        try:
            async with self.inference.get("/ping", timeout=aiohttp.ClientTimeout(total=5)) as response:
                if response.status != 200:
                    return False
                body = json.loads(await response.read())
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False
        return isinstance(body, dict) and body.get("status") == "Healthy"

    async def predict(
        self, label: str, name: str, version: str | None, body: bytes, timeout: float | None
    ) -> bytes:
        path = f"/predictions/{name}" + (f"/{version}" if version else "")
        limit = self._timeout if timeout is None else aiohttp.ClientTimeout(total=timeout)
        try:
            async with self.inference.post(
                path,
                data=_payload(body),
                headers={"Content-Type": wire.CONTENT_TYPE, **trace_headers()},
                timeout=limit,
            ) as response:
                status, content = response.status, await response.read()
        except TimeoutError as exc:
            raise DeadlineExceeded(f"{label}: TorchServe gave no answer in time") from exc
        except aiohttp.ClientConnectorError as exc:
            raise ConnectionRefused(f"{label}: TorchServe refused the connection").located(
                f"{self.inference_url}: {exc}"
            ) from exc
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(f"{label}: TorchServe is unreachable").located(
                f"{self.inference_url}: {exc}"
            ) from exc
        if status == 200:
            return content
        message = f"{label}: TorchServe answered {status}: {error_message(content)}"
        if status in (401, 403):
            message = f"{label}: TorchServe refused the gateway's token ({status})"
        raise remote_http_error(status)(message)

    async def manage(self, method: str, path: str, label: str, **params: Any) -> httpx.Response:
        try:
            response = await self.management.request(method, path, params=params or None)
        except httpx.TransportError as exc:
            raise BackendUnavailable(f"{label}: TorchServe management API is unreachable").located(
                f"{self.management.base_url}: {exc}"
            ) from exc
        if response.status_code in (401, 403):
            raise BackendError(f"{label}: TorchServe refused the management token ({response.status_code})")
        return response

    async def aclose(self) -> None:
        await self.inference.close()
        await self.management.aclose()
        # asyncio closes a transport on the loop's next pass: without one, a gateway (or test)
        # whose loop ends right after this leaves its last connections unclosed (aiohttp's
        # "graceful shutdown").
        await asyncio.sleep(0)


async def remote_client(shared: SharedResources, options: TorchServeOptions, label: str) -> TorchServeClient:
    """One client per remote TorchServe (and set of tokens) for every version served there."""
    assert options.inference_url is not None
    token = options.secret(options.token, options.token_env, label)
    management_token = options.secret(options.management_token, options.management_token_env, label)
    # The key names the tokens by a digest: logs may show it.
    digest = hashlib.sha256(f"{token}\0{management_token}".encode()).hexdigest()[:16]
    key = f"torchserve:{options.inference_url}:{options.management_url}:{options.timeout_s}:{digest}"

    async def open_client() -> TorchServeClient:
        assert options.inference_url is not None
        return TorchServeClient(
            options.inference_url, options.management_url, token, management_token, options.timeout_s
        )

    return await shared.get(key, open_client)
