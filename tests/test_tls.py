"""HTTPS: `sollol serve --certfile/--keyfile` with a self-signed certificate made at test time."""

import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
import time

import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sollol.history import create_history_engine
from sollol.keys import KeyStore
from tests.support.fake_node import FakeOpenAINode
from tests.support.fixtures import write_router_config


def write_self_signed(directory) -> tuple[str, str]:
    """Write a certificate for 127.0.0.1 and its key as PEM files; return their paths."""
    private_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sollol test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private_key, hashes.SHA256())
    )
    certfile = directory / "cert.pem"
    keyfile = directory / "key.pem"
    certfile.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(certfile), str(keyfile)


@pytest.fixture
def tls_router(tmp_path):
    """A router process serving HTTPS, with one key; yields (base URL, cert path, secret)."""
    certfile, keyfile = write_self_signed(tmp_path)
    database_path = tmp_path / "history.db"
    _, secret = KeyStore(create_history_engine(f"sqlite:///{database_path}")).create("tls")
    with FakeOpenAINode() as node:
        config = write_router_config(
            tmp_path / "sollol.toml",
            database_path=database_path,
            nodes=[{"name": "fake", "kind": "openai", "url": node.url, "models": ["tiny"]}],
        )
        command = [sys.executable, "-m", "sollol", "serve", "--config", str(config)]
        command += ["--certfile", certfile, "--keyfile", keyfile]
        log_path = tmp_path / "router.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=log_file,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        try:
            assert process.stdout is not None
            line = process.stdout.readline().decode()
            assert "listening on https://127.0.0.1:" in line, log_path.read_text()
            base_url = line.split("listening on ")[1].split()[0]
            wait_healthy(base_url, certfile)
            yield base_url, certfile, secret
        finally:
            process.terminate()
            process.wait(15)
            process.stdout.close()


def wait_healthy(base_url: str, certfile: str, timeout_s: float = 30.0) -> None:
    context = ssl.create_default_context(cafile=certfile)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(base_url + "/health", verify=context, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    pytest.fail(f"HTTPS router at {base_url} not healthy after {timeout_s} s")


def test_openai_sdk_over_https(tls_router):
    base_url, certfile, secret = tls_router
    context = ssl.create_default_context(cafile=certfile)
    with httpx.Client(verify=context) as http_client:
        client = openai.OpenAI(api_key=secret, base_url=base_url + "/v1", http_client=http_client)
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content
        stream = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        assert any(chunk.choices and chunk.choices[0].delta.content for chunk in stream)


def test_untrusted_certificate_rejected(tls_router):
    base_url, _, _ = tls_router
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(base_url + "/health", timeout=5.0)


def test_plain_http_gets_no_reply(tls_router):
    base_url, _, _ = tls_router
    with pytest.raises(httpx.TransportError):
        httpx.get(base_url.replace("https://", "http://") + "/health", timeout=5.0)
