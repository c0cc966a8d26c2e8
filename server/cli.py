"""`facetwin-server`: run the gRPC service. Every serve flag also reads FACETWIN_<NAME> from the environment."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import sys
import time
import typing
from pathlib import Path
from typing import Any, Optional

import typer

from . import limits, logs
from .config import ServerConfig, env_name

log = logging.getLogger(__name__)

# Plain help (no rich boxes): at a pipe's 80 columns rich cut the long flag and variable names short ("--max-stre…"),
# where plain help wraps them whole.
app = typer.Typer(add_completion=False, no_args_is_help=True, help="facetwin gRPC face-swap server",
                  rich_markup_mode=None)


@app.callback()
def _root() -> None:
    """facetwin gRPC face-swap server."""


def serve(log_level: str, dry_run: bool, **settings: Any) -> None:
    """Serve every bundle in the model directory until SIGTERM (then drain); SIGHUP reloads the directory."""
    try:
        if dry_run:
            settings.update(address="127.0.0.1:0", metrics_port=0)
        config = ServerConfig.from_env(**settings)
        logs.configure(log_level, config.log_format)
        warning = limits.frame_memory_warning(config.frame_memory_mb, config.processes, limits.memory_available())
        if warning:
            log.warning(warning)
        from .server import serve as run_server

        if dry_run:
            asyncio.run(_dry_run(config))
        elif config.processes > 1:
            from . import processes

            processes.run(config, log_level)
        else:
            asyncio.run(run_server(config))
    except (ValueError, FileNotFoundError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _setting_options() -> list[inspect.Parameter]:
    """One flag per ServerConfig field (--model-dir, ...), its help and default from the field: the config is
    declared once. A flag left out is None, so from_env falls back to FACETWIN_<FIELD>, then to the default."""
    types = typing.get_type_hints(ServerConfig)
    options = []
    for field in dataclasses.fields(ServerConfig):
        flag = "--" + field.name.replace("_", "-")
        decls = [f"{flag}/--no-{flag[2:]}"] if types[field.name] is bool else [flag]
        default = "empty" if field.default == "" else field.default
        text = f"{field.metadata['help']} (env {env_name(field.name)}, default {default})"
        options.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[types[field.name]],
                                         default=typer.Option(None, *decls, help=text, show_default=False)))
    return options


serve.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    inspect.Parameter("log_level", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                      default=typer.Option("INFO", envvar="FACETWIN_LOG_LEVEL", help="Logging level")),
    inspect.Parameter("dry_run", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                      default=typer.Option(False, "--dry-run", help="Load and warm every model, serve on a free "
                                           "loopback port, swap one blank face per model through real gRPC, then exit")),
    *_setting_options(),
])
app.command()(serve)


async def _dry_run(config: ServerConfig) -> None:
    import grpc
    import numpy as np

    from facetwin.v1 import facetwin_pb2 as pb
    from facetwin.v1 import facetwin_pb2_grpc as pb_grpc

    from .server import FaceSwapServer

    started = time.perf_counter()
    metadata = _dry_run_security(config)
    # The TLS files were checked above as serve checks them; the dry run itself holds no CA or client certificate,
    # so it listens (on loopback) in plaintext.
    server = FaceSwapServer(dataclasses.replace(config, tls_cert="", tls_key="", tls_client_ca=""))
    port = await server.start()
    await server.wait_until_loaded()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.FaceSwapStub(channel)
            listing = await stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
            for info in listing.models:
                if info.status != pb.MODEL_STATUS_READY:
                    typer.echo(f"model {info.name}: FAILED — {info.error}")
                    continue
                size = info.resolution
                face = np.full((size, size, 3), 128, np.uint8)
                reply = await stub.Swap(pb.SwapRequest(
                    model=info.name, target=info.identities[0],
                    image=pb.Image(raw=pb.RawImage(pixels=face.tobytes(), height=size, width=size, channels=3))),
                    metadata=metadata)
                typer.echo(f"model {info.name}: ready, identities {list(info.identities)}, {size} px, "
                           f"backend {info.backend}; test swap {reply.timings.total_ms:.1f} ms")
        ready = sum(m.status == pb.MODEL_STATUS_READY for m in listing.models)
        if not ready:
            raise ValueError(f"no model in {config.model_dir} loaded")
        if ready < len(listing.models):  # a deploy check: the server would start, without the failed ones
            raise ValueError(f"{len(listing.models) - ready} of {len(listing.models)} model(s) in {config.model_dir} "
                             "did not load (above): serve would serve only the others")
        typer.echo(f"dry run ok: {ready} model(s) ready, in {time.perf_counter() - started:.1f} s")
    finally:
        await server.stop(grace=1.0)


def _dry_run_security(config: ServerConfig) -> tuple[tuple[str, str], ...]:
    """Checks the TLS files and the tokens file as serve would; returns the metadata the dry run calls with."""
    from .auth import read_certificate_scopes, read_tokens, server_credentials

    if server_credentials(config) is not None:
        typer.echo(f"tls: {config.tls_cert} and its key are usable"
                   + (f"; clients must hold a certificate from {config.tls_client_ca}" if config.tls_client_ca else ""))
    if config.tls_client_models:
        typer.echo(f"tls: {len(read_certificate_scopes(config.tls_client_models))} client certificate name(s) limited "
                   f"to some models in {config.tls_client_models}")
    if not config.auth_tokens_file:
        return ()
    tokens = read_tokens(config.auth_tokens_file)
    name, token, _ = ([t for t in tokens if t[2] is None] or tokens)[0]  # one that may use every model, if any
    typer.echo(f"auth: {len(tokens)} token(s) in {config.auth_tokens_file}; the dry run calls as {name!r}")
    return (("authorization", f"Bearer {token}"),)


@app.command("build-engines")
def build_engines(
    model_dir: str = typer.Option("models", envvar="FACETWIN_MODEL_DIR", help="Folder of model bundles"),
    cache_dir: Optional[str] = typer.Option(None, help="Engine cache (default $FACETWIN_ENGINE_CACHE_DIR, else "
                                            "<model-dir>/.engines: where the tensorrt backend looks)"),
    max_batch: int = typer.Option(ServerConfig.max_batch, envvar="FACETWIN_MAX_BATCH", min=1,
                                  help="Largest batch the engines accept: use the server's --max-batch"),
    opt_batch: Optional[int] = typer.Option(None, min=1, help="Batch TensorRT tunes for (default: max-batch)"),
    workspace_gb: float = typer.Option(4.0, min=0.25, help="TensorRT builder scratch memory, GiB"),
    dry_run: bool = typer.Option(False, "--dry-run", help="No TensorRT needed: read every bundle, convert each "
                                 "target to fp16 ONNX and check it, compute the cache keys, report hit/miss"),
    log_level: str = typer.Option("WARNING", envvar="FACETWIN_LOG_LEVEL", help="Logging level"),
) -> None:
    """Build (or find cached) TensorRT engines for every (model, target), so the server starts without building."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .backends.tensorrt import TensorRTBackend
    from .backends.tensorrt_engines import EngineReport, build_all, default_cache_dir

    if not dry_run:
        ok, why = TensorRTBackend.available()
        if not ok:
            typer.echo(f"error: cannot build TensorRT engines here: {why}. Run this on the GPU host "
                       "(pip install 'facetwin[gpu]'), or pass --dry-run to check the bundles only.", err=True)
            raise typer.Exit(2)
    cache = Path(cache_dir) if cache_dir else default_cache_dir(model_dir)
    mode = "dry run, nothing built" if dry_run else "building missing engines"
    typer.echo(f"engine cache {cache} ({mode}); batch profile 1..{max_batch}")

    def show(report: EngineReport) -> None:
        key = report.key
        detail = f"fp16 ONNX ok, {report.fp16_onnx_bytes / 1024:.0f} KiB; " if report.fp16_onnx_bytes else ""
        typer.echo(f"  {report.model}/{report.target}: {report.status:5s} {report.path.name} "
                   f"({detail}gpu {key.gpu_name} sm {key.compute_capability}, TensorRT {key.tensorrt_version}, "
                   f"{report.seconds:.1f} s)")

    try:
        reports = build_all(model_dir, cache, max_batch=max_batch, opt_batch=opt_batch, dry_run=dry_run,
                            workspace_bytes=int(workspace_gb * (1 << 30)), report=show)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    counts = {status: sum(r.status == status for r in reports) for status in ("hit", "built", "miss")}
    typer.echo(f"{len(reports)} engine(s): {counts['hit']} cached, {counts['built']} built, "
               f"{counts['miss']} to build")


@app.command()
def healthcheck(
    address: str = typer.Option("127.0.0.1:50051", envvar="FACETWIN_HEALTH_ADDRESS", help="Server to probe"),
    timeout: float = typer.Option(3.0, help="Seconds to wait for the answer"),
    ca: Optional[Path] = typer.Option(None, envvar="FACETWIN_HEALTH_CA", help="PEM CA certificates that signed the "
                                      "server's certificate: probe over TLS"),
    cert: Optional[Path] = typer.Option(None, envvar="FACETWIN_HEALTH_CERT", help="PEM client certificate, for a "
                                        "server that wants one (mutual TLS); needs --ca and --key"),
    key: Optional[Path] = typer.Option(None, envvar="FACETWIN_HEALTH_KEY", help="PEM private key of --cert"),
    server_name: Optional[str] = typer.Option(None, envvar="FACETWIN_HEALTH_SERVER_NAME", help="Name the server's "
                                              "certificate must carry, when it is not the host of --address "
                                              "(a probe of 127.0.0.1 inside the container)"),
) -> None:
    """Exit 0 when the server reports SERVING on grpc.health.v1 (for Docker HEALTHCHECK), else 1. Health asks for
    no token; a TLS server needs --ca (and --cert/--key when it wants client certificates)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if (cert or key or server_name) and not ca or bool(cert) != bool(key):
        typer.echo("error: --cert and --key go together, and they and --server-name need --ca", err=True)
        raise typer.Exit(2)
    try:
        if ca is None:
            channel = grpc.insecure_channel(address)
        else:
            credentials = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes() if key else None,
                                                       cert.read_bytes() if cert else None)
            options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
            channel = grpc.secure_channel(address, credentials, options=options)
    except OSError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        with channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        typer.echo(f"unhealthy: {exc.code().name}: {exc.details()}", err=True)
        raise typer.Exit(1) from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    typer.echo(status)
    raise typer.Exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
