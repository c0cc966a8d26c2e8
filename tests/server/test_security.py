"""TLS, mutual TLS and bearer tokens on a real server over loopback, with certificates made by this test run."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from facetwin.client import (
    AsyncClient,
    AuthenticationError,
    Client,
    FaceMapping,
    FaceRule,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
)
from facetwin.server.auth import AuthInterceptor, TokenFile, client_id
from facetwin.server.config import ServerConfig
from facetwin.server.server import FaceSwapServer
from facetwin.v1 import facetwin_pb2 as pb
from facetwin.v1 import facetwin_pb2_grpc as pb_grpc

from ..conftest import ServerThread

SERVER = Path(sys.executable).with_name("facetwin-server")
TOKENS = "# clients of this server\nalice:alice-token-1\n\nbob:bob-token-2\n"


@dataclasses.dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path  # signed by other_ca: a stranger's certificate
    other_client_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(key, name: str, issuer_key=None, issuer: x509.Certificate | None = None, *, ca: bool = False,
          sans: tuple[x509.GeneralName, ...] = (), from_days: float = -1 / 288, to_days: float = 1) -> x509.Certificate:
    """Valid from `from_days` to `to_days` from now (by default 5 minutes ago to tomorrow)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(issuer.subject if issuer else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now + datetime.timedelta(days=from_days))
               .not_valid_after(now + datetime.timedelta(days=to_days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(folder: Path, name: str, cert: x509.Certificate, key=None) -> tuple[Path, Path | None]:
    cert_path = folder / f"{name}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is None:
        return cert_path, None
    key_path = folder / f"{name}.key"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key, other_key = _key(), _key()
    ca, other = _cert(ca_key, "facetwin test CA", ca=True), _cert(other_key, "a stranger's CA", ca=True)
    server_key, client_key, stranger_key = _key(), _key(), _key()
    server = _cert(server_key, "facetwin server", ca_key, ca,
                   sans=(x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))))
    return Pki(_write(folder, "ca", ca)[0], *_write(folder, "server", server, server_key),
               *_write(folder, "client", _cert(client_key, "alice", ca_key, ca), client_key),
               _write(folder, "other-ca", other)[0],
               *_write(folder, "stranger", _cert(stranger_key, "mallory", other_key, other), stranger_key))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outward_ip() -> str | None:
    """This host's address on its default route (no packet is sent), or None when it has no network."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        ip = s.getsockname()[0]
    return None if ip.startswith("127.") else ip


@pytest.fixture(scope="module")
def tls_server(tiny_model_dir, pki, tmp_path_factory):
    """TLS with bearer tokens, metrics on."""
    tokens = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    tokens.write_text(TOKENS)
    server = ServerThread(ServerConfig(
        address="127.0.0.1:0", model_dir=str(tiny_model_dir), grace_s=1.0, tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key), auth_tokens_file=str(tokens), metrics_port=_free_port()))
    yield server
    server.stop()


def _face(size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _secure_channel(address: str, pki: Pki, token: str | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes())
    if token:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(address, credentials)


def test_tls_with_a_token_serves_swaps_and_describes_itself(tls_server, pki, tiny_model_dir):
    with Client(tls_server.address, token="alice-token-1", root_certificates=pki.ca) as client:
        (model,) = client.list_models()
        result = client.swap(_face(model.resolution), model.name, model.identities[1], color="rgb")
        assert result.image.shape == (model.resolution, model.resolution, 3)
    with _secure_channel(tls_server.address, pki, "bob-token-2") as channel:  # the second token is as good
        info = pb_grpc.FaceSwapStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert info.tls and info.auth_required and not info.client_certificate_required


def test_tls_refuses_plaintext_and_untrusted_clients(tls_server, pki):
    with Client(tls_server.address, token="alice-token-1", timeout=5) as client:  # plaintext to a TLS port
        with pytest.raises(UnavailableError):
            client.list_models()
    with Client(tls_server.address, token="alice-token-1", root_certificates=pki.other_ca, timeout=5) as client:
        with pytest.raises(UnavailableError):  # the server's certificate is not signed by the CA the client trusts
            client.list_models()


@pytest.mark.parametrize("metadata, expected", [
    ((), "authorization: Bearer <token>"),
    ((("authorization", "Basic YWxpY2U6eA=="),), "malformed"),
    ((("authorization", "Bearer"),), "malformed"),
    ((("authorization", "Bearer not-a-token"),), "not accepted"),
])
def test_calls_without_a_valid_token_are_unauthenticated(tls_server, pki, metadata, expected):
    size = 32
    request = pb.SwapRequest(model="tiny", target="b", image=pb.Image(raw=pb.RawImage(
        pixels=_face(size).tobytes(), height=size, width=size, channels=3)))
    with _secure_channel(tls_server.address, pki) as channel:
        stub = pb_grpc.FaceSwapStub(channel)
        calls = [lambda: stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10),
                 lambda: stub.Swap(request, metadata=metadata, timeout=10),
                 lambda: list(stub.SwapStream(iter([pb.SwapStreamRequest(request=request)]),
                                              metadata=metadata, timeout=10))]
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert expected in info.value.details() and "not-a-token" not in info.value.details()


def test_an_async_stream_refused_for_its_credentials_raises_authentication_error(tls_server, pki):
    """The refusal comes before the server reads a frame, racing the SDK's first write; grpc.aio then loses the
    status, which the SDK must learn again rather than raise INTERNAL."""
    frames = [_face(32)] * 4

    async def refused() -> list[str]:
        outcomes = []
        async with AsyncClient(tls_server.address, root_certificates=pki.ca, timeout=10) as client:
            for _ in range(12):
                try:
                    async for _ in client.stream(frames, "tiny", "b", color="rgb"):
                        pass
                    outcomes.append("answered")
                except Exception as exc:
                    outcomes.append(type(exc).__name__)
        return outcomes

    assert asyncio.run(refused()) == ["AuthenticationError"] * 12


def test_health_is_open_and_reflection_asks_for_the_token(tls_server, pki):
    with _secure_channel(tls_server.address, pki) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as info:
            list(reflection.ServerReflectionInfo(iter([request]), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        replies = reflection.ServerReflectionInfo(iter([request]), timeout=10,
                                                  metadata=(("authorization", "Bearer alice-token-1"),))
        assert "facetwin.v1.FaceSwap" in {s.name for r in replies for s in r.list_services_response.service}


def test_healthcheck_command_probes_a_tls_server(tls_server, pki):
    probe = [str(SERVER), "healthcheck", "--address", tls_server.address, "--timeout", "5"]
    secure = subprocess.run(probe + ["--ca", str(pki.ca)], capture_output=True, text=True, timeout=60)
    assert secure.returncode == 0 and secure.stdout.strip() == "SERVING", secure.stderr
    plain = subprocess.run(probe, capture_output=True, text=True, timeout=60)
    assert plain.returncode == 1 and "unhealthy: UNAVAILABLE" in plain.stderr


def test_metrics_listen_on_loopback_only(tls_server):
    http = tls_server.server.metrics_http
    host, port = http.server_address[:2]
    assert host == "127.0.0.1"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert b"facetwin_queue_depth" in reply.read()
    outward = _outward_ip()
    if outward is not None:  # the same port on this host's network address is closed
        with pytest.raises(ConnectionRefusedError), socket.create_connection((outward, port), timeout=5):
            pass


@pytest.fixture(scope="module")
def mtls_server(tiny_model_dir, pki):
    server = ServerThread(ServerConfig(
        address="127.0.0.1:0", model_dir=str(tiny_model_dir), grace_s=1.0, tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key), tls_client_ca=str(pki.ca)))
    yield server
    server.stop()


def test_mutual_tls_admits_only_certificates_of_its_ca(mtls_server, pki, caplog):
    with Client(mtls_server.address, root_certificates=pki.ca.read_bytes(), client_certificate=pki.client_cert,
                client_key=pki.client_key) as client:
        assert [m.name for m in client.list_models()] == ["tiny"]
        with caplog.at_level(logging.INFO, logger="facetwin.server.calls"), pytest.raises(NotFoundError):
            client.swap(_face(32), "tiny", "nobody", color="rgb")
    # Without tokens, a client is named by its certificate (logs, per-client limits), not by its address.
    assert "Swap NOT_FOUND" in caplog.text and "(client alice," in caplog.text
    refused = [dict(), dict(client_certificate=pki.other_client_cert, client_key=pki.other_client_key)]
    for credentials in refused:  # no certificate; a certificate from another CA
        with Client(mtls_server.address, root_certificates=pki.ca, timeout=5, **credentials) as client:
            with pytest.raises(UnavailableError):
                client.list_models()
    probe = subprocess.run([str(SERVER), "healthcheck", "--address", mtls_server.address, "--ca", str(pki.ca),
                            "--cert", str(pki.client_cert), "--key", str(pki.client_key)],
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr


def test_a_client_certificate_may_be_limited_to_some_models(tiny_model_dir, pki, tmp_path, caplog):
    models = tmp_path / "client-models.txt"
    models.write_text("# certificates' common names\nalice models=tiny/ada\nmallory models=nothing-*\n")
    with pytest.raises(ValueError, match="needs --tls-client-ca"):
        ServerConfig(model_dir=str(tiny_model_dir), tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                     tls_client_models=str(models)).validate()
    server = ServerThread(ServerConfig(
        address="127.0.0.1:0", model_dir=str(tiny_model_dir), grace_s=1.0, tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key), tls_client_ca=str(pki.ca), tls_client_models=str(models)))
    try:
        with Client(server.address, root_certificates=pki.ca, client_certificate=pki.client_cert,
                    client_key=pki.client_key, timeout=10) as alice:
            assert [(m.name, m.identities) for m in alice.list_models()] == [("tiny", ("ada",))]
            assert alice.swap(_face(32), "tiny", "ada", color="rgb").image.shape == (32, 32, 3)
            with pytest.raises(PermissionDeniedError, match="may use models=tiny/ada"):
                alice.swap(_face(32), "tiny", "ben", color="rgb")
            with caplog.at_level(logging.INFO, logger="facetwin.server.auth"):
                models.write_text("alice models=tiny\n")  # re-read when it changes
                assert [(m.name, m.identities) for m in alice.list_models()] == [("tiny", ("ada", "ben"))]
                assert alice.swap(_face(32), "tiny", "ben", color="rgb").image.shape == (32, 32, 3)
                models.write_text("alice tiny\n")  # a bad rewrite keeps what was read before
                assert [(m.name, m.identities) for m in alice.list_models()] == [("tiny", ("ada", "ben"))]
            assert "line 1: expected NAME models=" in caplog.text
        assert REGISTRY.get_sample_value("facetwin_client_swaps_total",
                                         {"client": "alice", "model": "tiny", "target": "ada"}) >= 1
    finally:
        server.stop()


def _replace(path: Path, data: bytes) -> None:
    """As Kubernetes and cert-manager replace a mounted Secret's file: written aside, then renamed into place."""
    time.sleep(0.02)  # past the file system's clock tick, so the new file's mtime differs too
    path.with_name(path.name + ".new").write_bytes(data)
    os.replace(path.with_name(path.name + ".new"), path)


def _handshakes(address: str, trust: Path, cert: Path, key: Path) -> bool:
    """Whether a new connection (none shared with earlier channels) trusting `trust`, presenting `cert`, is served."""
    credentials = grpc.ssl_channel_credentials(trust.read_bytes(), key.read_bytes(), cert.read_bytes())
    with grpc.secure_channel(address, credentials, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            return True
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            return False


def test_certificates_rotate_for_new_connections_without_a_restart(tiny_model_dir, pki, tmp_path, caplog):
    tls = tmp_path / "tls"
    tls.mkdir()
    cert, key, client_ca = tls / "tls.crt", tls / "tls.key", tls / "ca.crt"
    for source, copy in ((pki.server_cert, cert), (pki.server_key, key), (pki.ca, client_ca)):
        copy.write_bytes(source.read_bytes())
    server = ServerThread(ServerConfig(address="127.0.0.1:0", model_dir=str(tiny_model_dir), grace_s=1.0,
                                       tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(client_ca)))
    alice, stranger = (pki.client_cert, pki.client_key), (pki.other_client_cert, pki.other_client_key)
    try:
        kept = Client(server.address, root_certificates=pki.ca, client_certificate=pki.client_cert,
                      client_key=pki.client_key, timeout=10)
        assert [m.name for m in kept.list_models()] == ["tiny"]
        # Renewed by another CA: the certificate lands first, its key a moment later.
        renewed_ca_key, renewed_key = _key(), _key()
        renewed_ca = _cert(renewed_ca_key, "renewed CA", ca=True)
        renewed = _cert(renewed_key, "facetwin server", renewed_ca_key, renewed_ca, to_days=30,
                        sans=(x509.IPAddress(ipaddress.ip_address("127.0.0.1")),))
        renewed_ca_file = _write(tmp_path, "renewed-ca", renewed_ca)[0]
        renewed_cert, renewed_key_file = _write(tmp_path, "renewed", renewed, renewed_key)
        with caplog.at_level(logging.INFO, logger="facetwin.server.auth"):
            _replace(cert, renewed_cert.read_bytes())
            assert _handshakes(server.address, pki.ca, *alice)  # the half-rotated files: the last good ones serve
            assert not _handshakes(server.address, renewed_ca_file, *alice)
            assert caplog.text.count("the key does not belong to the certificate") == 1
            _replace(key, renewed_key_file.read_bytes())
            assert _handshakes(server.address, renewed_ca_file, *alice)
            assert not _handshakes(server.address, pki.ca, *alice)
        assert caplog.text.count("TLS files re-read") == 1
        assert REGISTRY.get_sample_value("facetwin_tls_certificate_expiry_timestamp_seconds") == \
            renewed.not_valid_after_utc.timestamp()
        assert [m.name for m in kept.list_models()] == ["tiny"]  # its connection keeps its handshake's certificate
        kept.close()
        # The client CA rotates the same way: certificates of the new CA get in, the old CA's no longer.
        assert not _handshakes(server.address, renewed_ca_file, *stranger)
        _replace(client_ca, pki.other_ca.read_bytes())
        assert _handshakes(server.address, renewed_ca_file, *stranger)
        assert not _handshakes(server.address, renewed_ca_file, *alice)
    finally:
        server.stop()


def test_tokens_rotate_when_the_file_changes(tiny_model_dir, tmp_path, caplog):
    """Plaintext on loopback: the SDK sends the token over local credentials."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(TOKENS)
    server = ServerThread(ServerConfig(address="127.0.0.1:0", model_dir=str(tiny_model_dir), grace_s=1.0,
                                       auth_tokens_file=str(tokens)))
    try:
        def works(token: str) -> bool:
            with Client(server.address, token=token, timeout=10) as client:
                try:
                    return [m.name for m in client.list_models()] == ["tiny"]
                except AuthenticationError as exc:
                    assert exc.code == grpc.StatusCode.UNAUTHENTICATED
                    return False

        assert works("alice-token-1") and works("bob-token-2") and not works("carol-token-3")
        tokens.write_text("alice:alice-token-new\ncarol:carol-token-3\n")  # bob revoked, alice rotated
        assert works("carol-token-3") and works("alice-token-new")
        assert not works("bob-token-2") and not works("alice-token-1")
        with caplog.at_level(logging.ERROR, logger="facetwin.server.auth"):
            tokens.write_text("carol carol-token-3\n")  # a bad rewrite keeps the tokens read before
            assert works("carol-token-3") and not works("bob-token-2")
        assert "line 1: expected NAME:TOKEN" in caplog.text and "carol-token-3" not in caplog.text
    finally:
        server.stop()


def test_a_token_limited_to_some_models_and_identities_sees_and_uses_only_those(tiny_model_dir, tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("web:alice-token-1\nstudio:bob-token-2  models=tiny/ada,t?ny/nobody\npartner:carol-token-3 "
                      "models=actors-*\n")
    server = ServerThread(ServerConfig(address="127.0.0.1:0", model_dir=str(tiny_model_dir), grace_s=1.0,
                                       auth_tokens_file=str(tokens)))
    face = _face(32)
    try:
        with Client(server.address, token="alice-token-1", timeout=10) as alice, \
                Client(server.address, token="bob-token-2", timeout=10) as bob, \
                Client(server.address, token="carol-token-3", timeout=10) as carol:
            assert [(m.name, m.identities) for m in alice.list_models()] == [("tiny", ("ada", "ben"))]
            assert [(m.name, m.identities) for m in bob.list_models()] == [("tiny", ("ada",))]
            assert carol.list_models() == []
            assert alice.swap(face, "tiny", "ben", color="rgb").image.shape == face.shape
            assert bob.swap(face, "tiny", "ada", color="rgb").image.shape == face.shape
            # Refused before any work, alike whether the model exists or not: a scoped client learns nothing more.
            for client, model, target, scope in ((bob, "tiny", "ben", "tiny/ada,t?ny/nobody"),
                                                 (bob, "secret", "ada", "tiny/ada,t?ny/nobody"),
                                                 (carol, "tiny", "ada", "actors-*")):
                with pytest.raises(PermissionDeniedError) as denied:
                    client.swap(face, model, target, color="rgb")
                assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
                assert f"may not use model '{model}' with target '{target}'; it may use models={scope}" in \
                    denied.value.details
            # A whole frame whose mapping renders an identity outside the scope: refused before faces are looked for.
            mapping = FaceMapping([FaceRule(track_id=1, target="ben"), FaceRule(faces="all")])
            with pytest.raises(PermissionDeniedError):
                bob.swap(_face(128), "tiny", "ada", color="rgb", faces=mapping)
            with pytest.raises(PermissionDeniedError):  # a stream's mapping, on its first message: the stream refused
                list(bob.stream([_face(128)], "tiny", "ada", color="rgb", faces=mapping))
            # In a stream, a frame for an identity outside the scope is that frame's error; the others are swapped.
            results = list(bob.stream([face, face, face], "tiny", "ada", color="rgb", frame_errors="yield"))
            assert [r.error is None for r in results] == [True, True, True]
            outside = list(bob.stream([face], "tiny", "ben", color="rgb", frame_errors="yield"))
            assert outside[0].error is not None and outside[0].error.code == grpc.StatusCode.PERMISSION_DENIED
        # What each client swapped, for usage accounting: unary calls and stream frames, refusals not counted.
        swaps = {(client, target): REGISTRY.get_sample_value("facetwin_client_swaps_total",
                                                             {"client": client, "model": "tiny", "target": target})
                 for client, target in (("web", "ben"), ("studio", "ada"), ("studio", "ben"), ("partner", "ada"))}
        assert swaps == {("web", "ben"): 1, ("studio", "ada"): 4, ("studio", "ben"): None, ("partner", "ada"): None}
    finally:
        server.stop()


def test_unauthenticated_calls_that_end_before_their_refusal_are_logged_as_what_they_were(tiny_model_dir, tmp_path,
                                                                                         caplog):
    """A caller without a token who cancels at once, or whose deadline passes first, is no server fault: no INTERNAL,
    no traceback, however many such calls arrive."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(TOKENS)
    server = ServerThread(ServerConfig(address="127.0.0.1:0", model_dir=str(tiny_model_dir), grace_s=1.0,
                                       auth_tokens_file=str(tokens)))
    face = _face(32)
    request = pb.SwapRequest(model="tiny", target="ben", image=pb.Image(raw=pb.RawImage(
        pixels=face.tobytes(), height=32, width=32, channels=3)))
    try:
        with caplog.at_level(logging.INFO), grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.FaceSwapStub(channel)
            for _ in range(20):
                stub.Swap.future(request, timeout=5).cancel()
                with pytest.raises(grpc.RpcError):
                    stub.Swap(request, timeout=0.0005)
            with pytest.raises(grpc.RpcError) as refused:  # and the server still answers
                stub.Swap(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(server.address, token="alice-token-1", timeout=10) as client:
            assert client.swap(face, "tiny", "ben", color="rgb").image.shape == face.shape
    finally:
        server.stop()
    calls = [r for r in caplog.records if r.name == "facetwin.server.calls" and " Swap " in f" {r.getMessage()}"]
    assert calls, "the calls were not logged"
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [r.getMessage() for r in calls if "INTERNAL" in r.getMessage()]


def test_a_token_is_not_sent_in_the_clear_beyond_loopback(tiny_model_dir, tmp_path):
    outward = _outward_ip()
    if outward is None:
        pytest.skip("this host has no network address besides loopback")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(TOKENS)
    server = ServerThread(ServerConfig(address=f"{outward}:0", model_dir=str(tiny_model_dir), grace_s=1.0,
                                       auth_tokens_file=str(tokens)))
    try:
        with Client(f"{outward}:{server.port}", token="alice-token-1", timeout=5) as client:
            with pytest.raises(UnavailableError, match="loopback"):
                client.list_models()
    finally:
        server.stop()


async def test_client_id_is_the_token_name_else_the_peer_address(tmp_path):
    """What per-client limits key on, seen from inside a handler on unary and streaming calls."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(TOKENS)

    async def unary(request: bytes, context) -> bytes:
        return client_id(context).encode()

    async def stream(requests, context):
        async for _ in requests:
            await asyncio.sleep(0)
            yield client_id(context).encode()

    handler = grpc.method_handlers_generic_handler("probe.Who", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.stream_stream_rpc_method_handler(stream)})
    answers = {}
    for interceptors in ([AuthInterceptor(TokenFile(tokens))], []):
        server = grpc.aio.server(interceptors=interceptors)
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary_call, stream_call = channel.unary_unary("/probe.Who/Unary"), channel.stream_stream("/probe.Who/Stream")
            for token in ("alice-token-1", "bob-token-2"):
                metadata = (("authorization", f"Bearer {token}"),)
                streamed = [r async for r in stream_call(iter([b"", b""]), metadata=metadata)]
                answers[interceptors != [], token] = {await unary_call(b"", metadata=metadata), *streamed}
        await server.stop(None)
    assert answers[True, "alice-token-1"] == {b"alice"} and answers[True, "bob-token-2"] == {b"bob"}
    assert answers[False, "alice-token-1"] == answers[False, "bob-token-2"] == {b"127.0.0.1"}


@pytest.mark.parametrize("text, message", [
    ("", "holds no token"),
    ("# only a comment\n\n", "holds no token"),
    ("alice:secret-1\nbob secret-2\n", "line 2: expected NAME:TOKEN"),
    ("alice:secret-1\n:secret-2\n", "line 2: expected NAME:TOKEN"),
    ("alice:secret-1\nbob:secret-1\n", "line 2: this token is already given to 'alice'"),
    ("alice:secret-1 tiny\n", "line 1: after the token only models=MODEL[/TARGET],... may follow"),
    ("alice:secret-1 models=tiny models=demo\n", "line 1: after the token only models="),
    ("alice:secret-1 models=tiny/\n", "line 1: models=tiny/: each entry is MODEL or MODEL/TARGET"),
    ("alice:secret-1 models=tiny,,demo\n", "line 1: models=tiny,,demo: each entry is MODEL or MODEL/TARGET"),
])
def test_a_bad_tokens_file_is_a_startup_error(tmp_path, text, message):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        TokenFile(tokens)
    assert "secret" not in str(info.value)
    with pytest.raises(OSError, match="cannot be read"):
        TokenFile(tmp_path / "missing.txt")


def test_unusable_certificates_fail_at_start_with_the_reason(tiny_model_dir, pki, tmp_path):
    def start(**tls) -> None:
        FaceSwapServer(ServerConfig(address="127.0.0.1:0", model_dir=str(tiny_model_dir), **tls))

    with pytest.raises(ValueError, match="the key does not belong to the certificate"):
        start(tls_cert=str(pki.server_cert), tls_key=str(pki.client_key))
    with pytest.raises(ValueError, match="expected a PEM certificate chain"):
        start(tls_cert=str(pki.server_key), tls_key=str(pki.server_key))
    with pytest.raises(ValueError, match="no PEM certificate found"):
        start(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.server_key))
    with pytest.raises(OSError, match="--tls-key .* cannot be read"):
        start(tls_cert=str(pki.server_cert), tls_key=str(tmp_path / "missing.key"))
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), None)
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"passphrase")))
    with pytest.raises(ValueError, match="is encrypted"):
        start(tls_cert=str(pki.server_cert), tls_key=str(encrypted))
    # Dates: the server would start and look healthy while every client refused its certificate.
    for name, days, message in (("expired", (-30, -1), "expired on"), ("future", (1, 30), "is valid only from")):
        cert, key = _write(tmp_path, name, _cert(server_key := _key(), "facetwin server", from_days=days[0],
                                                  to_days=days[1]), server_key)
        with pytest.raises(ValueError, match=f"--tls-cert {cert} {message}"):
            start(tls_cert=str(cert), tls_key=str(key))


def test_dry_run_checks_the_credentials_and_calls_with_a_token(tiny_model_dir, pki, tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(TOKENS)
    env = {**os.environ, "FACETWIN_TLS_CERT": str(pki.server_cert), "FACETWIN_TLS_KEY": str(pki.server_key),
           "FACETWIN_TLS_CLIENT_CA": str(pki.ca), "FACETWIN_AUTH_TOKENS_FILE": str(tokens)}
    serve = [str(SERVER), "serve", "--dry-run", "--model-dir", str(tiny_model_dir)]
    result = subprocess.run(serve, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "the dry run calls as 'alice'" in result.stdout and "dry run ok: 1 model(s)" in result.stdout
    assert "alice-token-1" not in result.stdout + result.stderr
    tokens.write_text("# nobody yet\n")
    result = subprocess.run(serve, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "holds no token" in result.stderr


def test_sdk_credential_arguments_are_checked(pki):
    with pytest.raises(InvalidInputError, match="go together"):
        Client("localhost:1", root_certificates=pki.ca, client_certificate=pki.client_cert)
    with pytest.raises(InvalidInputError, match="token must be"):
        Client("localhost:1", token="two words")
    with pytest.raises(InvalidInputError, match="cannot read"):
        Client("localhost:1", root_certificates=pki.ca.with_name("missing.pem"))
    # Checked here: gRPC would only log the bad file and then fail to connect.
    with pytest.raises(InvalidInputError, match=r"root_certificates: the bytes given is not a PEM certificate"):
        Client("localhost:1", root_certificates=b"\x89PNG\r\n")
    with pytest.raises(InvalidInputError, match=r"client_key: .*client.pem is not a PEM private key"):
        Client("localhost:1", root_certificates=pki.ca, client_certificate=pki.client_cert,
               client_key=pki.client_cert)


def test_the_cli_takes_credentials_from_flags_and_environment(tls_server, pki, tmp_path):
    facetwin = str(Path(sys.executable).with_name("facetwin"))
    token_file = tmp_path / "token"
    token_file.write_text("alice-token-1\n")
    ok = subprocess.run([facetwin, "models", "--address", tls_server.address, "--ca", str(pki.ca), "--token-file",
                         str(token_file)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "tiny" in ok.stdout, ok.stderr
    env = {**os.environ, "FACETWIN_TOKEN": "bob-token-2", "FACETWIN_CA": str(pki.ca)}
    ok = subprocess.run([facetwin, "models", "--address", tls_server.address], capture_output=True, text=True,
                        timeout=60, env=env)
    assert ok.returncode == 0 and "tiny" in ok.stdout, ok.stderr
    refused = subprocess.run([facetwin, "models", "--address", tls_server.address, "--ca", str(pki.ca)],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and refused.stderr.startswith("error: UNAUTHENTICATED"), refused.stderr
    assert "alice-token-1" not in refused.stderr
    # Credential files that cannot be used are usage mistakes, named by their option, in one line.
    for flags, needle in ((["--ca", str(token_file)], "--ca: "), (["--ca", str(tmp_path / "none.pem")], "--ca: cannot read"),
                          (["--cert", str(pki.client_cert)], "--cert and --key go together"),
                          (["--cert", str(pki.client_cert), "--key", str(pki.client_cert)], "--key: ")):
        mistake = subprocess.run([facetwin, "models", "--address", tls_server.address, *flags], capture_output=True,
                                 text=True, timeout=60)
        assert mistake.returncode == 2 and mistake.stderr.count("\n") == 1, mistake.stderr
        assert mistake.stderr.startswith("error: ") and needle in mistake.stderr, mistake.stderr
