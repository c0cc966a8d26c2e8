"""Channel credentials of the SDK: TLS, mutual TLS and a bearer token, from PEM bytes or file paths."""

from __future__ import annotations

import os
from typing import Union

import grpc

from .errors import InvalidInputError

__all__ = ["PemInput", "channel_credentials", "read_pem"]

PemInput = Union[bytes, str, os.PathLike]  # PEM bytes or text, or the path of a PEM file


def _invalid(message: str) -> InvalidInputError:
    return InvalidInputError(grpc.StatusCode.INVALID_ARGUMENT, message)


def read_pem(value: PemInput, name: str, kind: str = "CERTIFICATE") -> bytes:
    """PEM bytes from bytes, text or a file path, checked to hold a `kind` block ("CERTIFICATE" or "PRIVATE KEY",
    which covers RSA and EC keys): gRPC itself would only log the problem and then fail to connect. `name` is what
    the caller called the value, for the message."""
    if isinstance(value, bytes):
        data, where = value, "the bytes given"
    elif isinstance(value, str) and "-----BEGIN" in value:
        data, where = value.encode(), "the text given"
    elif isinstance(value, (str, os.PathLike)):
        where = os.fspath(value)
        try:
            with open(value, "rb") as file:
                data = file.read()
        except OSError as exc:
            raise _invalid(f"{name}: cannot read {where}: {exc.strerror}") from None
    else:
        raise _invalid(f"{name} must be PEM bytes or the path of a PEM file, got {type(value).__name__}")
    if b"-----BEGIN " not in data or f"{kind}-----".encode() not in data:
        what = "certificate" if kind == "CERTIFICATE" else "private key"
        raise _invalid(f"{name}: {where} is not a PEM {what} (no '-----BEGIN ...{kind}-----' line)")
    return data


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
            read_pem(root_certificates, "root_certificates") if root_certificates else None,
            read_pem(client_key, "client_key", "PRIVATE KEY") if client_key else None,
            read_pem(client_certificate, "client_certificate") if client_certificate else None,
        )
    elif token is not None:
        local = grpc.LocalConnectionType.UDS if address.startswith("unix") else grpc.LocalConnectionType.LOCAL_TCP
        channel = grpc.local_channel_credentials(local)
    else:
        return None
    if token is None:
        return channel
    return grpc.composite_channel_credentials(channel, grpc.access_token_call_credentials(token))
