"""TLS and mTLS over a real server, with a CA and certificates this test makes (cryptography).

A client the server refuses at the TLS handshake (plaintext, no client certificate, a
certificate from another CA) never reaches a handler: grpc reports UNAVAILABLE, not
UNAUTHENTICATED, and the SDK raises ServerUnavailableError. The HTTP door serves HTTPS with
the same certificate and the same client-certificate rule.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import os
import re
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import TinyModel, engine_config
from loraplex.api.server import BackgroundServer
from loraplex.config import ANY_PORT, ApiConfig, ServerConfig
from loraplex.engine.engine import Engine
from loraplex_client import AuthenticationError, Client, ServerUnavailableError

TOKEN = "tls-admin-token"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_ca(cn: str) -> tuple[Any, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_leaf(ca_key: Any, ca_cert: x509.Certificate, cn: str, *, server: bool) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:  # gRPC checks the subject alternative name, not the CN
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return _pem_key(key), builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@dataclasses.dataclass
class Pki:
    ca: bytes
    server_key: Path
    server_cert: Path
    ca_file: Path
    client_key: bytes
    client_cert: bytes
    stranger_key: bytes  # a client certificate from another CA
    stranger_cert: bytes


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    out = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = make_ca("loraplex test CA")
    ca = ca_cert.public_bytes(serialization.Encoding.PEM)
    server_key, server_cert = make_leaf(ca_key, ca_cert, "localhost", server=True)
    client_key, client_cert = make_leaf(ca_key, ca_cert, "tenant-acme", server=False)
    other_key, other_ca = make_ca("another CA")
    stranger_key, stranger_cert = make_leaf(other_key, other_ca, "mallory", server=False)
    (out / "server.key").write_bytes(server_key)
    (out / "server.crt").write_bytes(server_cert)
    (out / "ca.crt").write_bytes(ca)
    return Pki(ca, out / "server.key", out / "server.crt", out / "ca.crt", client_key, client_cert, stranger_key, stranger_cert)


def _serve(tiny: TinyModel, pki: Pki, *, mutual: bool) -> BackgroundServer:
    config = engine_config(tiny, max_loras=2)
    api = ApiConfig(
        port=0, metrics_port=0, auth_tokens=(TOKEN,), tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
        tls_client_ca=str(pki.ca_file) if mutual else None, http_port=ANY_PORT,
    )
    server = BackgroundServer(ServerConfig(engine=config, api=api), Engine(config))
    server.start()
    return server


HTTP_PORTS: dict[str, int] = {}  # a served gRPC address -> its HTTP door's port


@pytest.fixture(scope="module")
def tls_server(tiny_llama: TinyModel, pki: Pki) -> Iterator[str]:
    server = _serve(tiny_llama, pki, mutual=False)
    address = f"127.0.0.1:{server.server.port}"
    HTTP_PORTS[address] = server.server.http_port
    yield address
    server.stop()


@pytest.fixture(scope="module")
def mtls_server(tiny_llama: TinyModel, pki: Pki) -> Iterator[str]:
    server = _serve(tiny_llama, pki, mutual=True)
    address = f"127.0.0.1:{server.server.port}"
    HTTP_PORTS[address] = server.server.http_port
    yield address
    server.stop()


def _https_models(address: str, context: ssl.SSLContext | None, scheme: str = "https") -> int:
    """GET /v1/models on the server's HTTP door as the admin: its status."""
    url = f"{scheme}://localhost:{HTTP_PORTS[address]}/v1/models"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=20, context=context) as response:
        return int(response.status)


def test_the_http_door_is_https_with_the_same_certificate(tls_server: str, mtls_server: str, pki: Pki) -> None:
    trusting = ssl.create_default_context(cafile=str(pki.ca_file))
    assert _https_models(tls_server, trusting) == 200
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext: no answer
        _https_models(tls_server, None, scheme="http")
    with pytest.raises(urllib.error.URLError):  # a client that does not trust the server's CA
        _https_models(tls_server, ssl.create_default_context())
    mutual = ssl.create_default_context(cafile=str(pki.ca_file))
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):  # mTLS: no client certificate
        _https_models(mtls_server, trusting)
    key, cert = pki.ca_file.parent / "client.key", pki.ca_file.parent / "client.crt"
    key.write_bytes(pki.client_key)
    cert.write_bytes(pki.client_cert)
    mutual.load_cert_chain(str(cert), str(key))
    assert _https_models(mtls_server, mutual) == 200


def _generate(address: str, tls: grpc.ChannelCredentials | None, token: str | None = TOKEN) -> list[int]:
    with Client(address, token=token, tls=tls, timeout=20) as client:
        return client.generate(prompt_token_ids=[5, 6, 7], max_new_tokens=3, ignore_eos=True).token_ids


def test_tls_serves_a_client_that_trusts_the_ca_and_refuses_plaintext(tls_server: str, pki: Pki) -> None:
    assert len(_generate(tls_server, grpc.ssl_channel_credentials(root_certificates=pki.ca))) == 3
    with pytest.raises(AuthenticationError):  # TLS does not replace the bearer token
        _generate(tls_server, grpc.ssl_channel_credentials(root_certificates=pki.ca), token=None)
    with pytest.raises(ServerUnavailableError):
        _generate(tls_server, None)
    with pytest.raises(ServerUnavailableError):  # a client that does not trust the server's CA
        _generate(tls_server, grpc.ssl_channel_credentials(root_certificates=make_ca("x")[1].public_bytes(serialization.Encoding.PEM)))


def test_the_readmes_tls_client_runs(mtls_server: str, pki: Pki, tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (code,) = [b for b in re.findall(r"^```python\n(.*?)^```", readme, flags=re.S | re.M) if "ssl_channel_credentials" in b]
    (tmp_path / "ca.crt").write_bytes(pki.ca)
    (tmp_path / "client.key").write_bytes(pki.client_key)
    (tmp_path / "client.crt").write_bytes(pki.client_cert)
    port = mtls_server.rsplit(":", 1)[1]
    run = subprocess.run(
        [sys.executable, "-c", code.replace("localhost:50051", f"localhost:{port}")], capture_output=True, text=True,
        timeout=120, cwd=tmp_path, env={**os.environ, "LORAPLEX_TOKEN": TOKEN},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip()  # the generated text


def test_mtls_requires_a_client_certificate_from_the_ca(mtls_server: str, pki: Pki) -> None:
    mutual = grpc.ssl_channel_credentials(root_certificates=pki.ca, private_key=pki.client_key, certificate_chain=pki.client_cert)
    assert len(_generate(mtls_server, mutual)) == 3
    with pytest.raises(ServerUnavailableError):  # no client certificate
        _generate(mtls_server, grpc.ssl_channel_credentials(root_certificates=pki.ca))
    with pytest.raises(ServerUnavailableError):  # plaintext
        _generate(mtls_server, None)
    stranger = grpc.ssl_channel_credentials(root_certificates=pki.ca, private_key=pki.stranger_key, certificate_chain=pki.stranger_cert)
    with pytest.raises(ServerUnavailableError):  # a certificate from another CA
        _generate(mtls_server, stranger)
    with Client(mtls_server, tls=mutual) as client:
        assert client.health()  # health works over mTLS, without a token
