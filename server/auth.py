"""Who may call: TLS server credentials (optionally mutual TLS) and bearer tokens checked by a server interceptor.

Every method except grpc.health.v1 asks for "authorization: Bearer <token>" when a tokens file is configured:
the FaceSwap API and reflection alike (reflection lists the API, so it is as private as the API). Health stays
open because load balancers and Kubernetes probe it without credentials. A token may be limited to some models and
identities (its line's `models=`): the servicer asks `authorize` before any work and lists only what it allows.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import datetime
import fnmatch
import hashlib
import hmac
import logging
import os
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Generic, TypeVar
from urllib.parse import unquote

import grpc

from . import metrics
from .config import ServerConfig
from .errors import PermissionDeniedError, shorten

log = logging.getLogger("facetwin.server.auth")
T = TypeVar("T")
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
_CLIENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("facetwin_client", default=None)
_SCOPE: contextvars.ContextVar[Scope | None] = contextvars.ContextVar("facetwin_scope", default=None)


@dataclasses.dataclass(frozen=True)
class Scope:
    """What one token may use: its line's `models=` patterns, each MODEL or MODEL/TARGET, with shell-style wildcards
    (`real`, `actors-*`, `studio/cap`). A MODEL alone allows every identity of the model."""

    patterns: tuple[tuple[str, str], ...]  # (model, target) patterns; target "*" when the pattern names none

    @classmethod
    def parse(cls, text: str) -> Scope:
        """ValueError when a pattern is empty or has more than one /."""
        patterns = []
        for item in text.split(","):
            model, sep, target = item.partition("/")
            if not model or (sep and not target) or "/" in target:
                raise ValueError(f"models={text}: each entry is MODEL or MODEL/TARGET (wildcards * ? allowed)")
            patterns.append((model, target or "*"))
        return cls(tuple(patterns))

    def allows(self, model: str, target: str) -> bool:
        return any(fnmatch.fnmatchcase(model, m) and fnmatch.fnmatchcase(target, t) for m, t in self.patterns)

    def allows_model(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, m) for m, _ in self.patterns)

    def __str__(self) -> str:
        return ",".join(m if t == "*" else f"{m}/{t}" for m, t in self.patterns)


def authorize(model: str, targets: Iterable[str]) -> None:
    """PermissionDeniedError unless the caller's token may render each of `targets` with `model`. The answer is the
    same whether the model exists or not, so a scoped client learns nothing of other clients' models."""
    scope = _SCOPE.get()
    if scope is None:
        return
    for target in targets:
        if not scope.allows(model, target):
            raise PermissionDeniedError(
                f"this client's token may not use model {shorten(model)} with target {shorten(target)}; it may use "
                f"models={scope} (the server's operator sets this in its tokens file)")


def visible_identities(model: str, identities: Iterable[str]) -> list[str] | None:
    """The identities of `model` the caller's token may use, or None when it may not use the model at all."""
    scope = _SCOPE.get()
    if scope is None:
        return list(identities)
    if not scope.allows_model(model):
        return None
    return [identity for identity in identities if scope.allows(model, identity)]


def client_id(context: grpc.aio.ServicerContext) -> str:
    """The caller, for logs and per-client limits: its token's NAME when tokens are in use, else (mutual TLS) the
    common name of its certificate, else its IP address.

    The interceptor sets the name in the call's task before the handler runs (grpc.aio runs both in one task, and
    each call in its own), so an async handler always sees its own caller.
    """
    name = named_client(context)
    return name if name else peer_host(context.peer())


def named_client(context: grpc.aio.ServicerContext) -> str:
    """The caller's token NAME, else its certificate's common name, else "": the names an operator gave out, so a
    bounded set (a metric label; an address is not)."""
    name = _CLIENT.get()
    if name is not None:
        return name
    # Only a certificate the handshake verified against --tls-client-ca gets this far, so its name can be trusted.
    common_names = context.auth_context().get("x509_common_name")
    return common_names[0].decode("utf-8", "replace") if common_names else ""


def peer_host(peer: str) -> str:
    """"ipv4:10.0.0.7:5123" -> "10.0.0.7", "ipv6:%5B::1%5D:5123" -> "::1"; other kinds (unix:...) stay whole."""
    kind, _, rest = unquote(peer).partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return unquote(peer)


class WatchedFile(Generic[T]):
    """What `read(path)` makes of a file, made again when the file's mtime, size or inode changes. A rewrite that
    cannot be read keeps the last good value (logged once, until the file changes again), so a half-written file
    never locks every client out; a bad file at start raises."""

    def __init__(self, path: str | os.PathLike, read: Callable[[Path], T], describe: Callable[[T], str]) -> None:
        self.path, self._read, self._describe = Path(path), read, describe
        self._stamp = file_stamp(self.path)
        self._value = read(self.path)

    def current(self) -> T:
        stamp = file_stamp(self.path)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._value = self._read(self.path)
            except (OSError, ValueError) as exc:
                log.error("%s; keeping what was read before (%s)", exc, self._describe(self._value))
            else:
                log.info("%s re-read: %s", self.path, self._describe(self._value))
        return self._value


class TokenFile:
    """Accepted bearer tokens, one `NAME:TOKEN` per line (blank lines and # comments allowed), optionally followed by
    `models=MODEL[/TARGET],...`: the models (and identities) that token may use (Scope); without it, all.

    Several lines may share a NAME (its old and new token while keys rotate). The file is re-read when it changes,
    so tokens rotate without a restart (WatchedFile).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._tokens = WatchedFile(self.path, lambda p: _digests(read_tokens(p)), lambda d: f"{len(d)} token(s)")

    def match(self, token: str) -> tuple[str, Scope | None] | None:
        """The NAME and scope of `token`, or None. Compares against every token: the time taken says nothing about
        which token (or how much of one) matched, and comparing digests hides the tokens' lengths too."""
        presented = _digest(token)
        found = None
        for digest, name, scope in self._tokens.current():
            if hmac.compare_digest(presented, digest):
                found = name, scope
        return found


class CertificateScopes:
    """Under mutual TLS, the models a client certificate may use, by its common name: one `NAME models=MODEL[/TARGET],
    ...` per line (blank lines and # comments allowed; NAME may hold spaces). A name not listed may use every model.
    Re-read when the file changes (WatchedFile)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._scopes = WatchedFile(path, read_certificate_scopes, lambda s: f"{len(s)} certificate name(s)")

    def bind(self, context: grpc.aio.ServicerContext) -> None:
        """Sets the call's scope from its certificate, unless a token already set one (a token is the more
        specific credential)."""
        if _CLIENT.get() is None and (name := named_client(context)):
            _SCOPE.set(self._scopes.current().get(name))


def _setting_lines(path: str | os.PathLike, setting: str) -> Iterator[tuple[str, str]]:
    """("<setting> <path> line N", the line) of each line of a file that holds something (blank lines and # comments
    skipped); OSError, naming the setting, when it cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OSError(f"{setting} {path} cannot be read: {exc}") from None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield f"{setting} {path} line {number}", line


def read_certificate_scopes(path: str | os.PathLike) -> dict[str, Scope]:
    """{common name: scope} of a certificate scopes file; OSError when it cannot be read, ValueError naming the line
    when it is malformed."""
    scopes: dict[str, Scope] = {}
    for where, line in _setting_lines(path, "tls_client_models"):
        name, sep, patterns = line.rpartition(" models=")
        if not sep or not name.strip() or not patterns:
            raise ValueError(f"{where}: expected NAME models=MODEL[/TARGET],... (NAME: a certificate's common name)")
        if name.strip() in scopes:
            raise ValueError(f"{where}: {name.strip()!r} is listed twice")
        try:
            scopes[name.strip()] = Scope.parse(patterns)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return scopes


def file_stamp(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """What tells a file changed: its mtime, size and inode (a rename puts a new inode in place); None when missing.
    It follows links, so the files of a Kubernetes volume change when their `..data` link moves."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def read_tokens(path: str | os.PathLike) -> list[tuple[str, str, Scope | None]]:
    """(NAME, TOKEN, scope) of every token line of a tokens file; OSError when it cannot be read, ValueError (naming
    the line, never the token) when it is malformed or holds no token."""
    tokens: dict[str, tuple[str, Scope | None]] = {}
    for where, line in _setting_lines(path, "auth_tokens_file"):
        name, sep, rest = (part.strip() for part in line.partition(":"))
        token, *more = rest.split() or [""]
        if not sep or not name or not token:
            raise ValueError(f"{where}: expected NAME:TOKEN [models=MODEL[/TARGET],...] (no spaces in TOKEN)")
        scope = None
        if more:
            key, _, value = more[0].partition("=")
            if len(more) > 1 or key != "models" or not value:
                raise ValueError(f"{where}: after the token only models=MODEL[/TARGET],... may follow")
            try:
                scope = Scope.parse(value)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        if tokens.get(token, (name,))[0] != name:
            raise ValueError(f"{where}: this token is already given to {tokens[token][0]!r}; each token must name one "
                             "client")
        tokens[token] = name, scope
    if not tokens:
        raise ValueError(f"auth_tokens_file {path} holds no token; add lines NAME:TOKEN")
    return [(name, token, scope) for token, (name, scope) in tokens.items()]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def _digests(tokens: list[tuple[str, str, Scope | None]]) -> list[tuple[bytes, str, Scope | None]]:
    return [(_digest(token), name, scope) for name, token, scope in tokens]


def _refuse(details: str) -> grpc.RpcMethodHandler:
    # A stream-stream handler whatever the method's kind: grpc.aio then calls it before reading any request
    # message, so an unauthenticated caller's payload (up to max_message_mb) is never parsed. The refusal is counted
    # and logged, with its request id, by interceptors.CallInterceptor.
    async def refuse(request_iterator, context: grpc.aio.ServicerContext) -> None:
        try:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, details)
        except grpc.aio.AbortError:
            raise
        except Exception:  # the refusal could not be sent: the call had ended (cancelled, its deadline passed)
            raise asyncio.CancelledError() from None

    return grpc.stream_stream_rpc_method_handler(refuse)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through when its bearer token is in the tokens file (health always); else UNAUTHENTICATED."""

    def __init__(self, tokens: TokenFile) -> None:
        self.tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(details)
        values = [value for key, value in details.invocation_metadata or () if key == "authorization"]
        if not values:
            return _refuse("this server needs credentials: send the metadata 'authorization: Bearer <token>' (SDK: "
                           "Client(address, token=...))")
        scheme, _, token = values[0].partition(" ")
        token = token.strip()
        if len(values) > 1 or scheme.lower() != "bearer" or not token:
            return _refuse("malformed authorization metadata: expected exactly one 'authorization: Bearer <token>'")
        found = self.tokens.match(token)
        if found is None:
            return _refuse("the bearer token sent is not accepted by this server (unknown or revoked); ask its "
                           "operator for a valid token")
        name, scope = found
        _CLIENT.set(name)
        _SCOPE.set(scope)
        log.debug("%s called by %s", method, name)
        return await continuation(details)


class TlsFiles:
    """The server's certificate, key and (mutual TLS) client CA, re-read for new connections when a file changes.

    gRPC calls `fetch` before each new connection's handshake; while the files are unchanged it answers None (keep
    the current ones), so a connection costs a stat of each file. Connections already open keep the certificate of
    their handshake. A rewrite that cannot serve (a new certificate before its key, an expired one, a half-written
    file) keeps the files read before and is logged once; a file changing while it is read is read again at the next
    connection. Kubernetes replaces a mounted Secret's files in one rename, and cert-manager renews them that way.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._lock = threading.Lock()  # gRPC may call fetch from several of its threads at once
        self._stamp = self._stat()
        self._current, expires = self._read()  # raises: unusable files at start are a startup error
        metrics.TLS_CERT_EXPIRY.set(expires.timestamp())

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._current, self.fetch,
                                                   require_client_authentication=bool(self.config.tls_client_ca))

    def _stat(self) -> tuple[tuple[int, int, int] | None, ...]:
        config = self.config
        return tuple(file_stamp(path) for path in (config.tls_cert, config.tls_key, config.tls_client_ca) if path)

    def _read(self) -> tuple[grpc.ServerCertificateConfiguration, datetime.datetime]:
        """The files' configuration and when the certificate expires."""
        config = self.config
        chain, key = _read_pem(config.tls_cert, "--tls-cert"), _read_pem(config.tls_key, "--tls-key")
        client_ca = _read_pem(config.tls_client_ca, "--tls-client-ca") if config.tls_client_ca else None
        expires = _check_tls_files(config)
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=client_ca), expires

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The files' new configuration when they changed and can serve, else None (gRPC keeps the current one)."""
        try:
            with self._lock:
                stamp = self._stat()
                if stamp == self._stamp:
                    return None
                read, error = None, None
                try:
                    read = self._read()
                except (OSError, ValueError) as exc:
                    error = exc
                if self._stat() != stamp:  # written while it was read: look again at the next connection
                    return None
                self._stamp = stamp  # a bad version is reported once, not at every connection until it changes
                if error is not None:
                    log.error("%s; new connections keep the certificate read before", error)
                    return None
                self._current, expires = read
                metrics.TLS_CERT_EXPIRY.set(expires.timestamp())
                log.info("TLS files re-read: new connections get %s, valid until %s UTC", self.config.tls_cert,
                         f"{expires:%Y-%m-%d %H:%M}")
                return self._current
        except Exception:  # raised into gRPC's handshake, it would fail the connection: keep serving instead
            log.exception("re-reading the TLS files failed; new connections keep the certificate read before")
            return None


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the listening port (None: plaintext), re-read as the files change (TlsFiles). The files are
    checked with Python's ssl first, so a wrong path, a key that does not match its certificate or an encrypted key
    fails with a message that says so (gRPC itself only reports "Failed to bind")."""
    return TlsFiles(config).credentials() if config.tls_cert else None


def _check_tls_files(config: ServerConfig) -> datetime.datetime:
    """When the server's certificate expires; ValueError, naming the setting, when the (readable) TLS files cannot
    serve."""
    def encrypted() -> bytes:
        raise ValueError(f"--tls-key {config.tls_key} is encrypted; give the server an unencrypted PEM key (keep it "
                         "readable by the server's user only)")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key, password=encrypted)
    except ssl.SSLError as exc:
        raise ValueError(f"--tls-cert {config.tls_cert} with --tls-key {config.tls_key}: {_ssl_reason(exc)}") from None
    expires = _check_dates(config.tls_cert)
    if config.tls_client_ca:
        try:
            context.load_verify_locations(cafile=config.tls_client_ca)
        except ssl.SSLError as exc:
            raise ValueError(f"--tls-client-ca {config.tls_client_ca}: {_ssl_reason(exc)}") from None
    return expires


def _check_dates(path: str) -> datetime.datetime:
    """The certificate's expiry; ValueError when the server's certificate (the chain's first) is expired or not yet valid: every client would
    refuse it, while the server itself would start and look healthy."""
    from cryptography import x509

    certificate = x509.load_pem_x509_certificates(Path(path).read_bytes())[0]
    now = datetime.datetime.now(datetime.timezone.utc)
    if certificate.not_valid_after_utc < now:
        raise ValueError(f"--tls-cert {path} expired on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: "
                         "every client would refuse it; renew it")
    if certificate.not_valid_before_utc > now:
        raise ValueError(f"--tls-cert {path} is valid only from {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} "
                         "UTC: check this host's clock, or the certificate's dates")
    return certificate.not_valid_after_utc


def _ssl_reason(exc: ssl.SSLError) -> str:
    if exc.reason == "KEY_VALUES_MISMATCH":
        return "the key does not belong to the certificate"
    if exc.reason == "NO_CERTIFICATE_OR_CRL_FOUND":
        return "no PEM certificate found"
    if exc.reason is None:  # OpenSSL's "PEM lib": one of the two files is not PEM of the expected kind
        return "expected a PEM certificate chain and its PEM private key"
    return f"not usable ({exc.reason})"


def _read_pem(path: str, name: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise OSError(f"{name} {path} cannot be read: {exc.strerror}") from None
