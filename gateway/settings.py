"""The gateway's settings, read once: flags first, then MODELYARD_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.config import MODEL_NAME, LoadMode
from gateway.residency import parse_budget


def _native_grpc_installed() -> bool:
    """Whether pygrpc-native imports here (a wheel exists for this platform and is installed)."""
    try:
        import pygrpc_native.aio  # noqa: F401
    except ImportError:
        return False
    return True


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELYARD_", protected_namespaces=(), extra="ignore")

    model_repo: Path = Path("model_repo")
    # Serve model_repo as this one model's folder (version folders, or the artifact itself), as
    # KServe's storage initializer leaves /mnt/models; None: model_repo holds a folder per model.
    model_name: str | None = Field(default=None, pattern=MODEL_NAME.pattern)
    host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=0, le=65535)
    grpc_port: int = Field(default=8001, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Serving processes on the same two ports (SO_REUSEPORT), under a supervisor that restarts
    # them and merges their metrics; 1: the gateway is one process, with no supervisor.
    workers: int = Field(default=1, ge=1, le=64)
    # gRPC messages carry whole tensors: allow far more than gRPC's 4 MiB default.
    grpc_max_message_mb: int = Field(default=256, ge=1)
    # How long in-flight requests may run on after a shutdown signal (the drain timeout).
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    # Across all models: requests running at once, and waiting behind them, on top of each
    # model's own `limits`. None: no global cap.
    global_max_inflight: int | None = Field(default=None, ge=1)
    global_max_queue: int = Field(default=1024, ge=0)
    # The header (gRPC: metadata key) that names a request's priority: high, normal or low.
    priority_header: str = "x-priority"
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    # Allocations up to this many MiB come from malloc's heap, not a fresh mapping each
    # (gateway/allocator.py); 0: glibc's own threshold.
    malloc_mmap_threshold_mb: int = Field(default=8, ge=0, le=32)
    # Seconds between scans of the repository for new, changed or removed models; None: never,
    # and models change only through the repository API.
    poll_interval_s: float | None = Field(default=None, gt=0)
    # Where models whose config.yaml has `record:` keep the inputs of their sampled requests, a
    # folder per model; relative to the gateway's working directory.
    record_dir: Path = Path(".modelyard/recorded")
    # The repository control API (load and unload a model) changes what the gateway serves:
    # off unless asked for, as Triton's --model-control-mode=explicit is.
    enable_repository_api: bool = False
    # When models load: eager (at start) or on_demand (at each one's first request); a model's
    # `load:` in config.yaml says otherwise for that model.
    load_mode: LoadMode = "eager"
    # The most memory the models may hold resident, measured at each load: bytes ("2GiB",
    # "1500MB", "1073741824") or a share of the machine's memory ("50%"). Past it, a load first
    # unloads the least recently used versions that no request is running on. None: no budget.
    model_memory_budget: str | None = None

    # Input hardening: every request is held to these before anything is allocated for it.
    # A REST body over its limit is refused while it is read (413), a gzip/deflate body too once
    # inflated. Binary bodies (Triton's binary extension) may be up to max_request_body_mb; JSON
    # bodies, and the JSON header of a binary one, up to the smaller of the two limits.
    max_request_body_mb: float = Field(default=256, gt=0)
    max_json_body_mb: float = Field(default=64, gt=0)
    # The REST bodies of all requests in flight together; one that would pass it is 429.
    max_inflight_body_mb: float = Field(default=1024, gt=0)
    # Elements in one tensor (the product of its shape), and in any one dimension.
    max_tensor_elements: int = Field(default=1 << 28, ge=1)
    # Nesting of a JSON body: objects and lists inside one another.
    max_json_depth: int = Field(default=64, ge=2)
    # Bytes in one element of a BYTES tensor.
    max_bytes_element_mb: float = Field(default=16, gt=0)

    # Connections. REST: open connections past the cap are answered 503 and closed; a header
    # block (request line and headers) over its size or count is 431; a connection that has not
    # sent a whole header block this long after it opened, or after a request began, is closed;
    # an idle kept-alive one is closed after the keep-alive timeout.
    http_max_connections: int = Field(default=1000, ge=1)
    http_max_header_kb: float = Field(default=64, gt=0)
    http_max_headers: int = Field(default=256, ge=1)
    http_header_timeout_s: float = Field(default=10, gt=0)
    http_keepalive_timeout_s: float = Field(default=5, gt=0)
    # gRPC: connections past the cap are refused; metadata over its size is refused; a connection
    # that has not finished its handshake in time, or is idle this long, is closed; streams per
    # connection are capped.
    # The gRPC server: "native", pygrpc-native, whose HTTP/2 work runs in Rust outside the GIL (no
    # TLS), with the connection cap, handshake timeout and idle close kept by the gateway from its
    # sockets (gateway/grpc_native.py); or grpcio's (grpc.aio). "auto" becomes "native" where
    # pygrpc-native is installed and TLS is off, and "grpcio" otherwise.
    grpc_server: Literal["auto", "grpcio", "native"] = "auto"
    grpc_max_connections: int = Field(default=1000, ge=1)
    grpc_max_metadata_kb: int = Field(default=16, ge=1)
    grpc_handshake_timeout_s: float = Field(default=10, gt=0)
    grpc_max_connection_idle_s: float = Field(default=300, gt=0)
    grpc_max_concurrent_streams: int = Field(default=128, ge=1)
    # Requests of one ModelStreamInfer stream that run at once (answers not yet sent included);
    # past it the stream reads no further request until an answer is sent.
    grpc_stream_max_inflight: int = Field(default=64, ge=1)
    # Server-Timing in the trailing metadata of every gRPC ModelInfer and Predict answer, and in the
    # `server_timing` parameter of every ModelStreamInfer answer; off: only of calls (streams) whose
    # metadata asks for it with `x-server-timing: true`. REST answers always carry it.
    grpc_server_timing: bool = False
    # Seconds a managed TorchServe keeps running once no model version uses it (after the last
    # TorchServe model was unloaded or moved to another backend) before it stops; a later load
    # starts it again.
    torchserve_idle_stop_s: float = Field(default=30.0, gt=0)

    # Auth (off unless keys are given): API keys or bearer tokens, each scoped to models and actions.
    # A YAML or JSON file of keys, or the same list as JSON in MODELYARD_API_KEYS (see README, "Auth").
    api_keys_file: Path | None = None
    api_keys: SecretStr | None = None
    # Health (/v2/health/*, gRPC health and ServerLive/Ready) and /metrics answer without a key.
    auth_open_health: bool = True
    auth_open_metrics: bool = True

    # Triton's system shared-memory extension: clients may register /dev/shm objects as regions
    # that inputs are read from and outputs written to. Off, as Triton's --allow-client-shm: a
    # client that may register can have the gateway read and write any shared memory of its user.
    allow_client_shm: bool = False

    # TLS for both HTTP and gRPC, from PEM files: both or neither.
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None

    # OpenTelemetry tracing, under the standard OTEL_* names (no MODELYARD_ prefix): off unless
    # OTEL_TRACES_EXPORTER names an exporter (otlp or console). The SDK reads the others itself
    # (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_TRACES_SAMPLER, OTEL_BSP_*...).
    otel_traces_exporter: str = Field(default="none", validation_alias="OTEL_TRACES_EXPORTER")
    otel_sdk_disabled: bool = Field(default=False, validation_alias="OTEL_SDK_DISABLED")
    otel_service_name: str = Field(default="modelyard", validation_alias="OTEL_SERVICE_NAME")
    otel_exporter_otlp_protocol: str = Field(
        default="http/protobuf",
        validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"),
    )

    @model_validator(mode="after")
    def _tls_and_grpc_server(self) -> Settings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("TLS needs both tls_certfile and tls_keyfile")
        if self.tls_certfile is not None and self.grpc_server == "native":
            raise ValueError("the native gRPC server has no TLS: serve TLS with grpc_server grpcio")
        if self.grpc_server == "auto":
            native = self.tls_certfile is None and _native_grpc_installed()
            self.grpc_server = "native" if native else "grpcio"
        return self

    @field_validator("model_memory_budget")
    @classmethod
    def _budget(cls, value: str | None) -> str | None:
        if value is not None:
            parse_budget(value)
        return value

    @property
    def model_memory_budget_bytes(self) -> int | None:
        return None if self.model_memory_budget is None else parse_budget(self.model_memory_budget)

    @property
    def max_request_body_bytes(self) -> int:
        return int(self.max_request_body_mb * 1024 * 1024)

    @property
    def max_json_body_bytes(self) -> int:
        return int(min(self.max_json_body_mb, self.max_request_body_mb) * 1024 * 1024)

    @property
    def max_inflight_body_bytes(self) -> int:
        return int(self.max_inflight_body_mb * 1024 * 1024)

    @property
    def max_bytes_element_bytes(self) -> int:
        return int(self.max_bytes_element_mb * 1024 * 1024)
