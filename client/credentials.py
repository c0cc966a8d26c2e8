"""Channel credentials of the SDK: TLS, mutual TLS and a bearer token, from PEM bytes or file paths."""

from __future__ import annotations

import os
from typing import Union

import grpc

from .errors import InvalidInputError

__all__ = ["PemInput", "channel_credentials"]

PemInput = Union[bytes, str, os.PathLike]  # PEM bytes or text, or the path of a PEM file


def _invalid(message: str) -> InvalidInputError:
    return InvalidInputError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _read_pem(value: PemInput, name: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and "-----BEGIN" in value:
        return value.encode()
    if not isinstance(value, (str, os.PathLike)):
        raise _invalid(f"{name} must be PEM bytes or the path of a PEM file, got {type(value).__name__}")
    try:
        with open(value, "rb") as file:
            return file.read()
    except OSError as exc:
        raise _invalid(f"{name}: cannot read {os.fspath(value)}: {exc.strerror}") from None


def channel_credentials(
    address: str,
    *,
    token: str | None = None,
    tls: bool = False,
    root_certificates: PemInput | None = None,
    client_certificate: PemInput | None = None,
    client_key: PemInput | None = None,
) -> grpc.ChannelCredentials | None:
    """The credentials of a channel to `address`; None means plaintext without a token.

    TLS is used when `tls` is set or any certificate is given (no root_certificates: gRPC's bundled public roots).
    The token rides as call credentials ("authorization: Bearer <token>" on every call). gRPC sends call
    credentials only over a secure channel, so without TLS the channel uses local credentials: plaintext, but
    gRPC connects only to a loopback address or a unix socket, so a token never crosses a network in the clear.
    """
    if bool(client_certificate) != bool(client_key):
        raise _invalid("client_certificate and client_key go together (mutual TLS): give both or neither")
    if token is not None:
        if not isinstance(token, str) or not token.strip() or any(c.isspace() for c in token.strip()):
            raise _invalid("token must be a non-empty string without spaces (the TOKEN of the server's NAME:TOKEN)")
        token = token.strip()
    if tls or root_certificates or client_certificate:
        channel = grpc.ssl_channel_credentials(
            _read_pem(root_certificates, "root_certificates") if root_certificates else None,
            _read_pem(client_key, "client_key") if client_key else None,
            _read_pem(client_certificate, "client_certificate") if client_certificate else None,
        )
    elif token is not None:
        local = grpc.LocalConnectionType.UDS if address.startswith("unix") else grpc.LocalConnectionType.LOCAL_TCP
        channel = grpc.local_channel_credentials(local)
    else:
        return None
    if token is None:
        return channel
    return grpc.composite_channel_credentials(channel, grpc.access_token_call_credentials(token))
