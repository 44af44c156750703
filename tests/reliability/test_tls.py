"""TLS for HTTP and gRPC from a certificate and key file: a self-signed certificate made here,
trusted by httpx, tritonclient (http and grpc) and the TF Serving stubs; plain connections fail."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tritonclient.utils import InferenceServerException

from tests.support import RunningGateway, start_gateway

GOOD = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, valid for a day, and its private key (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modelyard-test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


@pytest.fixture(scope="module")
def tls_gateway(small_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    workdir = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(workdir)
    running = start_gateway(
        small_repo,
        workdir / "gateway.log",
        "--tls-certfile",
        str(cert),
        "--tls-keyfile",
        str(key),
        tls_ca=cert,
    )
    yield running
    assert running.stop() == 0


def test_https_with_httpx(tls_gateway: RunningGateway) -> None:
    assert tls_gateway.tls_ca is not None
    trust = ssl.create_default_context(cafile=str(tls_gateway.tls_ca))
    with httpx.Client(base_url=tls_gateway.url, verify=trust, timeout=30) as client:
        answer = client.post("/v2/models/affine/infer", json=GOOD)
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["shape"] == [1, 3]
    # Without trusting the certificate, or without TLS, there is no answer.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{tls_gateway.url}/v2/health/ready", timeout=10)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{tls_gateway.http}/v2/health/ready", timeout=10)


def test_tritonclient_http_over_tls(tls_gateway: RunningGateway) -> None:
    assert tls_gateway.tls_ca is not None
    client = triton_http.InferenceServerClient(
        tls_gateway.http, ssl=True, ssl_options={"ca_certs": str(tls_gateway.tls_ca)}
    )
    try:
        tensor = triton_http.InferInput("x", [2, 4], "FP32")
        tensor.set_data_from_numpy(np.ones((2, 4), np.float32), binary_data=True)
        assert client.infer("affine", [tensor]).as_numpy("y").shape == (2, 3)
    finally:
        client.close()


def test_grpc_over_tls(tls_gateway: RunningGateway) -> None:
    assert tls_gateway.tls_ca is not None
    root = tls_gateway.tls_ca.read_bytes()
    client = triton_grpc.InferenceServerClient(
        tls_gateway.grpc, ssl=True, root_certificates=str(tls_gateway.tls_ca)
    )
    try:
        tensor = triton_grpc.InferInput("x", [2, 4], "FP32")
        tensor.set_data_from_numpy(np.ones((2, 4), np.float32))
        assert client.infer("affine", [tensor]).as_numpy("y").shape == (2, 3)
    finally:
        client.close()
    # The TF Serving API on the same port, over the same TLS.
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "affine"
    with grpc.secure_channel(tls_gateway.grpc, grpc.ssl_channel_credentials(root)) as channel:
        status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=30)
        assert [s.version for s in status.model_version_status] == [1]
    # A plaintext client gets no service.
    plain = triton_grpc.InferenceServerClient(tls_gateway.grpc)
    try:
        with pytest.raises(InferenceServerException):
            plain.is_server_live(client_timeout=2)
    finally:
        plain.close()


def test_tls_needs_both_files(small_repo: Path, tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path)
    with pytest.raises(RuntimeError) as caught:
        start_gateway(small_repo, tmp_path / "log.txt", "--tls-certfile", str(cert))
    assert "both tls_certfile and tls_keyfile" in str(caught.value)
