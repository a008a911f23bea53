"""Mutual TLS, and reloading the policy and certificates without a restart.

Certificates are made here with `cryptography.x509`: a CA, a server
certificate for 127.0.0.1/localhost, client certificates whose common name
is the principal. The dev-mode principals (dev-admin, dev-backup...) authenticate by
token only; the fixture adds cert-admin and cert-backup, which use certificates.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kms.v1 import kms_pb2, kms_pb2_grpc
from server.policy import hash_token
from tests.conftest import RunningKms, start_kms
from tests.integration.kms_helpers import KEY, reason_of

NOW = datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return _issued(certificate, key)


def make_leaf(
    ca: Issued, common_name: str, *, server: bool = False, expired: bool = False
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    not_after = NOW - datetime.timedelta(days=1) if expired else NOW + datetime.timedelta(days=7)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=2))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return _issued(builder.sign(ca.key, hashes.SHA256()), key)


def _issued(certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Issued:
    return Issued(
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        certificate,
        key,
    )


@dataclass
class TlsKms:
    kms: RunningKms
    ca: Issued
    files: dict[str, Path]
    channels: list[grpc.Channel]

    def stub(
        self, client: Issued | None, *, trust: Issued | None = None, token: str | None = None
    ) -> kms_pb2_grpc.KeyManagementServiceStub:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(trust or self.ca).cert_pem,
            private_key=client.key_pem if client else None,
            certificate_chain=client.cert_pem if client else None,
        )
        channel = grpc.secure_channel(self.kms.address, credentials)
        self.channels.append(channel)
        stub = kms_pb2_grpc.KeyManagementServiceStub(channel)
        if token is not None:
            return _WithToken(stub, token)  # type: ignore[return-value]
        return stub


class _WithToken:
    def __init__(self, stub: kms_pb2_grpc.KeyManagementServiceStub, token: str) -> None:
        self._stub, self._token = stub, token

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        call = getattr(self._stub, name)
        return lambda request, **kw: call(
            request, metadata=(("authorization", f"Bearer {self._token}"),), **kw
        )


CERTIFICATE_PRINCIPALS = """
[principals.cert-admin]
auth = ["certificate"]

[[principals.cert-admin.grants]]
roles = ["admin"]
keys = ["*"]

[principals.cert-backup]
auth = ["certificate"]

[[principals.cert-backup.grants]]
roles = ["backup"]
keys = ["*"]
"""


@pytest.fixture
def tls_kms(tmp_path: Path) -> Iterator[TlsKms]:
    ca = make_ca("kms-test-clients-and-server-ca")
    server = make_leaf(ca, "kms-server", server=True)
    files = {
        "cert": tmp_path / "server.crt",
        "key": tmp_path / "server.key",
        "ca": tmp_path / "client-ca.crt",
    }
    files["cert"].write_bytes(server.cert_pem)
    files["key"].write_bytes(server.key_pem)
    files["ca"].write_bytes(ca.cert_pem)
    kms = start_kms(
        tmp_path / "kms",
        tls_cert=str(files["cert"]),
        tls_key=str(files["key"]),
        tls_client_ca=str(files["ca"]),
    )
    kms.address = f"127.0.0.1:{kms.server.port}"
    policy_file = kms.data_dir / "policy.toml"
    policy_file.write_text(policy_file.read_text() + CERTIFICATE_PRINCIPALS)
    assert kms.server.reload()
    running = TlsKms(kms, ca, files, [])
    try:
        yield running
    finally:
        for channel in running.channels:
            channel.close()
        kms.server.stop(grace_seconds=1)


def _register(stub: kms_pb2_grpc.KeyManagementServiceStub) -> None:
    stub.RegisterKeyVersion(
        kms_pb2.RegisterKeyVersionRequest(key_name=KEY, activate_first_version=True), timeout=10
    )


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    code: grpc.StatusCode = caught.value.code()
    return code


def test_a_mapped_client_certificate_gets_exactly_its_roles(tls_kms: TlsKms) -> None:
    admin = tls_kms.stub(make_leaf(tls_kms.ca, "cert-admin"))
    backup = tls_kms.stub(make_leaf(tls_kms.ca, "cert-backup"))
    _register(admin)
    issued = backup.GetActiveKey(
        kms_pb2.GetActiveKeyRequest(key_name=KEY, backup_id="tls-backup"), timeout=10
    )
    assert issued.version == 1 and len(issued.data_key) == 32
    with pytest.raises(grpc.RpcError) as caught:
        backup.RotateActive(kms_pb2.RotateActiveRequest(key_name=KEY, to_version=1), timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as caught:
        admin.GetActiveKey(kms_pb2.GetActiveKeyRequest(key_name=KEY, backup_id="b2"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_certificate_without_a_mapped_principal_is_unauthenticated(tls_kms: TlsKms) -> None:
    stranger = tls_kms.stub(make_leaf(tls_kms.ca, "stranger"))
    with pytest.raises(grpc.RpcError) as caught:
        _register(stranger)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reason_of(caught.value) == "CERTIFICATE_NOT_MAPPED"


def test_a_certificate_naming_a_token_only_principal_is_unauthenticated(
    tls_kms: TlsKms,
) -> None:
    """The trusted CA signs CN=dev-admin: still no way in, dev-admin authenticates by token."""
    impostor = tls_kms.stub(make_leaf(tls_kms.ca, "dev-admin"))
    with pytest.raises(grpc.RpcError) as caught:
        _register(impostor)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Exactly what an unmapped name gets: the answer does not say that dev-admin exists.
    assert reason_of(caught.value) == "CERTIFICATE_NOT_MAPPED"
    assert "dev-admin" in (caught.value.details() or "")  # the CN it was given, nothing more
    # The same principal with its token, over the same TLS, is let in.
    _register(tls_kms.stub(make_leaf(tls_kms.ca, "cert-backup"), token=tls_kms.kms.tokens["admin"]))


@pytest.mark.parametrize("client", ["none", "other-ca", "expired"])
def test_unacceptable_client_certificates_are_refused_at_the_handshake(
    tls_kms: TlsKms, client: str
) -> None:
    certificate = {
        "none": None,
        "other-ca": make_leaf(make_ca("some-other-ca"), "cert-admin"),
        "expired": make_leaf(tls_kms.ca, "cert-admin", expired=True),
    }[client]
    # A token does not help: without an acceptable certificate there is no connection at all.
    stub = tls_kms.stub(certificate, token=tls_kms.kms.tokens["admin"])
    assert _code(lambda: _register(stub)) == grpc.StatusCode.UNAVAILABLE
    # The server is unharmed.
    _register(tls_kms.stub(make_leaf(tls_kms.ca, "cert-admin")))


def test_a_rotated_server_certificate_is_served_after_reload(tls_kms: TlsKms) -> None:
    client = make_leaf(tls_kms.ca, "cert-admin")
    new_ca = make_ca("kms-test-new-server-ca")
    new_server = make_leaf(new_ca, "kms-server-2", server=True)
    tls_kms.files["cert"].write_bytes(new_server.cert_pem)
    tls_kms.files["key"].write_bytes(new_server.key_pem)
    # Not before the reload: the server still presents the old certificate.
    assert (
        _code(lambda: _register(tls_kms.stub(client, trust=new_ca))) == grpc.StatusCode.UNAVAILABLE
    )
    assert tls_kms.kms.server.reload()
    _register(tls_kms.stub(client, trust=new_ca))
    # Clients that trust only the old CA no longer connect.
    stale = tls_kms.stub(client)
    assert _code(lambda: stale.ListKeys(kms_pb2.ListKeysRequest(), timeout=10)) == (
        grpc.StatusCode.UNAVAILABLE
    )


def test_unusable_certificate_files_are_not_reloaded(
    tls_kms: TlsKms, caplog: pytest.LogCaptureFixture
) -> None:
    other = make_leaf(tls_kms.ca, "kms-server", server=True)
    tls_kms.files["key"].write_bytes(other.key_pem)  # no longer matches the certificate
    with caplog.at_level("ERROR"):
        assert not tls_kms.kms.server.reload()
    assert any("certificates not reloaded" in r.getMessage() for r in caplog.records)
    _register(tls_kms.stub(make_leaf(tls_kms.ca, "cert-admin")))


# Policy reload (over plaintext loopback: the policy is the same whatever the transport)


def test_policy_reload_adds_and_removes_tokens(
    kms: RunningKms, caplog: pytest.LogCaptureFixture
) -> None:
    new_token = "a-new-operator-token-0123456789abcdef"
    channel = grpc.insecure_channel(kms.address)
    try:
        stub = kms_pb2_grpc.KeyManagementServiceStub(channel)
        metadata = (("authorization", f"Bearer {new_token}"),)

        def list_keys() -> object:
            return stub.ListKeys(kms_pb2.ListKeysRequest(), metadata=metadata, timeout=10)

        assert _code(list_keys) == grpc.StatusCode.UNAUTHENTICATED
        policy_file = kms.data_dir / "policy.toml"
        original = policy_file.read_text()
        policy_file.write_text(
            original + f'\n[principals.new-operator]\nauth = ["token"]\n'
            f'token_sha256 = ["{hash_token(new_token)}"]\n'
            '[[principals.new-operator.grants]]\nroles = ["admin"]\nkeys = ["*"]\n',
        )
        assert kms.server.reload()
        list_keys()
        # A policy that does not parse leaves the one in force: fail safe, not open.
        policy_file.write_text("[principals.broken\n")
        with caplog.at_level("ERROR"):
            assert not kms.server.reload()
        assert any("policy not reloaded" in r.getMessage() for r in caplog.records)
        list_keys()
        kms.stub("admin").ListKeys(kms_pb2.ListKeysRequest())
        # Removed from the policy: refused from the next call on.
        policy_file.write_text(original)
        assert kms.server.reload()
        assert _code(list_keys) == grpc.StatusCode.UNAUTHENTICATED
        kms.stub("admin").ListKeys(kms_pb2.ListKeysRequest())
    finally:
        channel.close()
