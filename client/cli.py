"""The `facetwin` command line: list models; swap the faces in photos, videos, folders of them, and live video,
through a server.

Needs the `cli` extra (typer, tqdm, PyAV); the SDK itself does not. Expected failures (server unreachable, unknown
model, a file that is not media) print one `error: ...` line and exit 1; usage mistakes exit 2; Ctrl-C exits 130
and leaves no half-written output (`live` ends its output properly instead, and a first Ctrl-C is its normal end);
nothing prints a traceback. A folder run reports each failed file on its own line, goes on with the rest, and
exits 1 if any failed.
"""

import dataclasses
import datetime
import importlib
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .batch import BatchInterrupted, BatchItem, PlanError, expected_frames, plan_batch, run_batch, write_summary
from .client import DEFAULT_ADDRESS, Client
from .credentials import read_pem
from .errors import FaceTwinError, InvalidInputError, MediaFileError, NotFoundError, UnavailableError
from .files import photo_scale, swap_image_file, swap_video_file
from .images import FacesArg, request_headroom, sniff_format
from .live import LiveReport, live_options, swap_live
from .mapping import FaceMapping
from .media import (
    IMAGE_OUTPUTS,
    IMAGE_SUFFIXES,
    VIDEO_OUTPUTS,
    VIDEO_SUFFIXES,
    check_writable,
    output_encoding,
    probe,
    read_image,
)
from .scaling import FrameLimits, fit_scale
from .types import FileReport
from .video import VideoOptions

ADDRESS_ENV = "FACETWIN_ADDRESS"
_MODEL_UNAVAILABLE = "model "  # how the server's UNAVAILABLE for a model still loading or failed begins
SUMMARY_NAME = "facetwin-summary.json"


class CliError(Exception):
    """An expected failure: printed as one `error: ...` line, exit code `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _describe(err: FaceTwinError, address: str, secure: bool = False) -> str:
    """One line for an SDK error. secure: the call was made over TLS (--tls or --ca)."""
    details = " ".join(err.details.split())  # gRPC details can span lines; the CLI prints one
    if isinstance(err, MediaFileError):
        return details
    if isinstance(err, UnavailableError):
        if details.startswith(_MODEL_UNAVAILABLE):  # the server answers; the model it was asked for does not
            return f"{details} (the server at {address} answers; its models: facetwin models --address {address})"
        hint = ""
        if re.fullmatch(r"[\w.-]+|\[[0-9a-fA-F:.]+\]", address):  # a host alone: gRPC's default port is 443
            port = DEFAULT_ADDRESS.rsplit(":", 1)[1]
            hint = f"; no port was given, so 443 was tried: add one ({address}:{port} is facetwin-server's default)"
        elif secure and "handshake failed" in details.lower():
            hint = "; TLS handshake failed: is --ca the CA that signed the server's certificate?"
        elif not secure and re.search(r"Socket closed|Connection reset|handshake", details, re.I):
            # A TLS server closes a plaintext connection at its first bytes.
            hint = "; the server may speak TLS: pass --tls (and --ca for a private CA)"
        return f"server at {address} is unavailable ({details}){hint}"
    if isinstance(err, NotFoundError):
        return f"{details} (list what is loaded with: facetwin models --address {address})"
    return f"{err.code.name}: {details}"


def run_models(address: str, credentials: dict[str, Any] | None = None) -> None:
    """Prints a table of the models loaded on the server."""
    with Client(address, **(credentials or {})) as client:
        models = client.list_models()
    if not models:
        print(f"no models loaded at {address}")
        return
    # VERSION: the start of the manifest's sha256, which changes with each export (answers carry it in provenance).
    header = ("NAME", "IDENTITIES", "RESOLUTION", "BACKEND", "VERSION", "STATUS")
    rows = [(m.name, ",".join(m.identities), str(m.resolution), m.backend, m.manifest_sha256[:12] or "-", m.status)
            for m in models]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    for m in models:
        if m.error:
            print(f"{m.name}: {m.error}")


def run_info(address: str, credentials: dict[str, Any] | None = None, as_json: bool = False) -> None:
    """Prints how the server is configured: version, security, stream defaults and every limit (GetServerInfo)."""
    with Client(address, **(credentials or {})) as client:
        info = dataclasses.asdict(client.server_info())
    # float32 on the wire: 0.6 arrives as 0.6000000238418579; seven significant digits are all it holds.
    info = _rounded(info)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    limits = info.pop("limits")
    rows = [*info.items(), *((f"limits.{name}", value) for name, value in limits.items())]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        shown = ",".join(map(str, value)) if isinstance(value, list) else value
        print(f"{name.ljust(width)}  {shown}")


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.7g}")
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return value


def parse_faces(text: str | None, aligned: bool, references: list[Path] | None = None,
                match_threshold: float | None = None) -> FacesArg:
    """--faces / --aligned / --reference -> the SDK's `faces`: None (aligned crops), "largest", "all", a face index,
    or a FaceMapping that swaps only the person the --reference photos show."""
    if references:
        if aligned or text is not None:
            raise CliError("--reference picks the faces by who they are: leave out --faces and --aligned", 2)
        return FaceMapping.person(*(read_image(path, "a --reference") for path in references),
                                  match_threshold=match_threshold)
    if match_threshold is not None:
        raise CliError("--match-threshold applies with --reference only", 2)
    if aligned:
        if text is not None:
            raise CliError("--faces chooses among a photo's faces: an --aligned crop is one face; leave out --faces", 2)
        return None
    text = text or "largest"
    if text in ("largest", "all"):
        return text
    if text.isdigit():
        return int(text)
    raise CliError(f"--faces must be largest, all or a face number (0 = largest), got {text!r}", 2)


def _describe_faces(faces: FacesArg) -> str:
    if isinstance(faces, FaceMapping):
        photos = sum(len(rule.reference) for rule in faces.rules)
        return f"the person in {photos} reference photo(s)"
    return str(faces)


def _summary_line(report: FileReport) -> str:
    per_second = report.frames / report.seconds if report.seconds else 0.0
    audio = f"; {report.audio_streams} audio stream(s) copied" if report.audio_streams else ""
    scaled = f"; {report.scale_note}" if report.scale_note else ""
    return (f"wrote {report.output}: {report.frames} frame(s), {report.frames_with_faces} with a face, "
            f"{report.faces_swapped} face(s) swapped, in {report.seconds:.1f} s ({per_second:.1f} frames/s){audio}"
            f"{scaled}")


_DRY_RUN_TIMEOUT_S = 5.0


def _dry_run_limits(address: str, credentials: dict[str, Any]) -> tuple[FrameLimits | None, str]:
    """The limits a dry run checks sizes against (asked of the server: no work is sent), or a note saying why they
    are not checked."""
    try:
        with Client(address, timeout=_DRY_RUN_TIMEOUT_S, **credentials) as client:
            info = client.server_info()
            return FrameLimits.from_server(info.limits, client.max_message_bytes), ""
    except FaceTwinError as exc:
        return None, f"note: sizes not checked against the server's limits ({_describe(exc, address)})"


def _size_note(kind: str, source: Path, info: Any, limits: FrameLimits | None, faces: FacesArg, output: Path,
               mask: bool = False) -> str:
    """"" when a file goes to the server as it is; "sent at 1/k scale: why" when it will be sent scaled down. Raises
    MediaFileError when no scale fits."""
    if limits is None or faces is None:
        return ""
    if kind == "image":
        k, reason = photo_scale(read_image(source), limits, faces, output_encoding(output), mask)
    else:
        k, reason = fit_scale(info.height, info.width, limits, request_headroom(faces, color="rgb"))
    if not reason:
        return ""
    if k == 0:
        raise MediaFileError(source, f"is {info.width}x{info.height}, {reason}, and sent at any scale it would not "
                                     "fit the server's limits")
    return f"sent as pixels: {reason}" if k == 1 else f"sent at 1/{k} scale: {reason}"


def _kind_of(path: Path) -> tuple[str, Any]:
    """("image", None) for PNG/JPEG bytes (no decoding needed), else (kind, MediaInfo) from FFmpeg."""
    try:
        with open(path, "rb") as file:
            if sniff_format(file.read(8)) is not None:
                return "image", None
    except OSError:
        pass  # probe says what is wrong with it
    info = probe(path)
    return info.kind, info


def _inspect(source: Path) -> tuple[str, Any, str]:
    """(kind, MediaInfo, a one-line description) of an input; FFmpeg decodes its first picture to prove it."""
    info = probe(source)
    turned = f", turned {info.rotation} degrees" if info.rotation else ""
    if info.kind == "image":
        return info.kind, info, f"{info.codec} {info.width}x{info.height}{turned}"
    frames = f"{info.frames} frames" if info.frames else "frame count unknown"
    return info.kind, info, (f"{info.codec} {info.width}x{info.height}, {info.fps or 0:g} fps, {frames}{turned}, "
                             f"audio: {', '.join(info.audio) or 'none'}")


def _swap_one(source: Path, output: Path, *, only: str | None, mask: Path | None, dry_run: bool,
              progress_bar: Any, **swap: Any) -> None:
    kind, info, description = _inspect(source) if dry_run else (*_kind_of(source), "")
    if only is not None and kind != only:
        raise CliError(f"{source} is a photo, not a video" if kind == "image" else f"{source} is not a {only}")
    suffixes = IMAGE_OUTPUTS if kind == "image" else VIDEO_OUTPUTS
    if output.suffix.lower() not in suffixes:
        raise CliError(f"OUT {output} must end in {', '.join(suffixes)} for a {'photo' if kind == 'image' else kind}", 2)
    if mask is not None and kind != "image":
        raise CliError("--mask applies to photos only", 2)
    video_options, address, max_in_flight = swap.pop("options"), swap.pop("address"), swap.pop("max_in_flight")
    credentials = swap.pop("credentials")
    if dry_run:
        check_writable(output, source)
        if mask is not None:
            check_writable(mask, source)
        limits, unchecked = _dry_run_limits(address, credentials)
        scaled = _size_note(kind, source, info, limits, swap["faces"], output, mask is not None)
        scaled = f"; {scaled}" if scaled else ""
        if kind == "image":
            print(f"dry run: would send {source} ({description}) to {address}: model={swap['model']} "
                  f"target={swap['target']} faces={_describe_faces(swap['faces'])} -> {output}"
                  + (f", mask -> {mask}" if mask is not None else "") + scaled)
        else:
            frames = min(info.frames, video_options.max_frames or info.frames) if info.frames else None
            audio = ", audio copied" if info.audio else ""
            print(f"dry run: would stream {frames or 'all'} frames of {source} ({description}) to {address}: "
                  f"model={swap['model']} target={swap['target']} faces={_describe_faces(swap['faces'])} -> {output} "
                  f"({video_options.codec} yuv420p{audio}){scaled}")
        if unchecked:
            print(unchecked)
        return
    with Client(address, **credentials) as client:
        if kind == "image":
            report = swap_image_file(client, source, output, mask=mask, quality=swap.pop("quality"), **swap)
        else:
            swap.pop("quality")
            total = info.frames and min(info.frames, video_options.max_frames or info.frames)
            with progress_bar(total=total, unit="frame", desc=source.name, disable=None) as bar:
                report = swap_video_file(client, source, output, options=video_options, max_in_flight=max_in_flight,
                                         progress=bar.update, **swap)
    print(_summary_line(report))


def _swap_many(inputs: list[str], out_dir: Path, *, only: str | None, list_file: Path | None, jobs: int,
               overwrite: bool, summary: Path | None, dry_run: bool, progress_bar: Any, **swap: Any) -> None:
    if out_dir.is_file():
        raise CliError(f"OUT {out_dir} is a file; with several inputs OUT is the folder the results go to", 2)
    try:
        items = plan_batch(inputs, out_dir, list_file=list_file, only=only)
    except PlanError as exc:
        raise CliError(str(exc), 2) from None
    if not items:
        raise CliError(f"no {only or 'image or video'} files in {', '.join(inputs)}", 2)
    summary = summary or out_dir / SUMMARY_NAME
    pending = [i for i in items if i.error is None and (overwrite or not i.output.exists())]
    if dry_run:
        limits, unchecked = _dry_run_limits(swap["address"], swap["credentials"]) if pending else (None, "")
        bad = 0
        for item in items:
            if item.error is None and item in pending:
                try:
                    check_writable(item.output, item.source)  # as the real run does before each file
                    kind, info, description = _inspect(item.source)
                    scaled = _size_note(kind, item.source, info, limits, swap["faces"], item.output)
                    state = f"swap ({description}{'; ' + scaled if scaled else ''})"
                except MediaFileError as exc:
                    state, bad = f"would fail ({exc.details})", bad + 1
            else:
                state = f"would fail ({item.error})" if item.error else "skip (output exists)"
            print(f"{item.source}" + (f" -> {item.output}" if item.output else "") + f": {state}")
        print(f"dry run: {len(pending) - bad} of {len(items)} file(s) would be swapped through {swap['address']} "
              f"({jobs} at a time); summary -> {summary}")
        if unchecked:
            print(unchecked)
        check_writable(summary)  # the real run stops here before any file
        failing = bad + sum(item.error is not None for item in items)
        if failing:
            raise CliError(f"dry run: {failing} of {len(items)} file(s) would fail")
        return
    check_writable(summary)
    total = sum(expected_frames(item) or 0 for item in pending) or None  # a broken file counts 0 (it fails fast)
    lock = threading.Lock()
    finished = [0]
    pending_inputs = {str(item.source) for item in pending}
    started = time.perf_counter()
    header = {"model": swap["model"], "target": swap["target"], "faces": _describe_faces(swap["faces"]),
              "address": swap["address"],
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    with progress_bar(total=total, unit="frame", desc=f"0/{len(pending)} files", disable=None) as bar:

        def advance(frames: int) -> None:
            with lock:
                bar.update(frames)

        def on_entry(entry: dict[str, Any]) -> None:
            with lock:
                if entry["status"] == "failed":
                    bar.write(f"error: {entry['error']}", file=sys.stderr)
                if entry["status"] in ("done", "failed") and entry["input"] in pending_inputs:
                    finished[0] += 1
                    bar.set_description(f"{finished[0]}/{len(pending)} files")

        address, credentials = swap.pop("address"), swap.pop("credentials")
        secure = bool(credentials.get("tls") or credentials.get("root_certificates"))
        try:
            with Client(address, **credentials) as client:
                _check_model(client, swap["model"], swap["target"], address)
                allowed = _jobs_allowed(client, jobs, pending)
                if allowed < jobs:
                    bar.write(f"note: -j {jobs}: the server allows {allowed} at a time per client; running {allowed}",
                              file=sys.stderr)
                entries = run_batch(client, items, jobs=allowed, overwrite=overwrite, progress=advance,
                                    on_entry=on_entry, describe=lambda err: _describe(err, address, secure),
                                    **swap)
            if bar.total is not None and bar.n < bar.total:
                # Files that failed are over with fewer frames than counted for them: the run is done, so is the bar.
                bar.update(bar.total - bar.n)
        except BatchInterrupted as exc:
            write_summary(summary, exc.entries, **header, seconds=time.perf_counter() - started, interrupted=True)
            raise
    counts = write_summary(summary, entries, **header, seconds=time.perf_counter() - started)
    print(", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + f"; summary: {summary}")
    if counts.get("failed"):
        raise CliError(f"{counts['failed']} of {len(entries)} file(s) failed (see {summary})")


def _check_model(client: Client, model: str, target: str, address: str) -> None:
    """A folder run's model and target, checked once before the first file: a mistyped name would fail every file,
    one error line each."""
    try:
        models = {m.name: m for m in client.list_models(timeout=10)}
    except FaceTwinError:  # an unreachable server: run_batch stops at the first file and says so
        return
    hint = f"(list what is loaded with: facetwin models --address {address})"
    if model not in models:
        raise CliError(f"model {model!r} is not loaded at {address}; loaded models: {sorted(models)} {hint}")
    if target not in models[model].identities:
        raise CliError(f"model {model!r} has no target identity {target!r}; choose one of "
                       f"{list(models[model].identities)} {hint}")


def _jobs_allowed(client: Client, jobs: int, pending: list[BatchItem]) -> int:
    """-j, lowered to the server's per-client limit on open streams (videos) and calls in flight (photos), so that
    files are not refused for running at once."""
    try:
        limits = client.server_info(timeout=10).limits
    except FaceTwinError:  # a server without GetServerInfo, or none: each file reports what goes wrong
        return jobs
    kinds = {item.kind for item in pending}
    caps = [limits[name] for kind, name in (("video", "max_streams_per_client"), ("image", "max_calls_per_client"))
            if kind in kinds and limits.get(name)]
    return min([jobs, *caps])


def run_swap(inputs: list[Path] | None, output: str | Path, *, model: str, target: str, only: str | None = None,
             aligned: bool = False, faces: str | None = None, references: list[Path] | None = None,
             match_threshold: float | None = None, keep_shape: float | None = None,
             quality: int | None = None, mask: Path | None = None, codec: str = "libx264", crf: int | None = 18,
             preset: str | None = None, max_frames: int | None = None, max_in_flight: int = 8,
             list_file: Path | None = None, jobs: int = 2, overwrite: bool = False, summary: Path | None = None,
             address: str = DEFAULT_ADDRESS, credentials: dict[str, Any] | None = None,
             dry_run: bool = False) -> None:
    """`facetwin swap` / `swap-video`: one file to one file, or many (folders, patterns, a list) into a folder.
    credentials: Client's keyword arguments for a server that asks for them (token, root_certificates, ...)."""
    from tqdm import tqdm

    try:
        options = VideoOptions(codec=codec, crf=crf, preset=preset, max_frames=max_frames)
    except InvalidInputError as exc:
        raise CliError(exc.details, 2) from None
    if keep_shape is not None and aligned:
        raise CliError("--keep-shape applies to whole frames, not to --aligned crops", 2)
    swap = dict(model=model, target=target, faces=parse_faces(faces, aligned, references, match_threshold),
                keep_shape=keep_shape,
                quality=quality, options=options, max_in_flight=max_in_flight, address=address,
                credentials=credentials or {})
    inputs = [str(path) for path in inputs or []]
    # One file to one file, unless OUT is a folder (then the file goes into it, as in a folder run).
    single = len(inputs) == 1 and list_file is None and not Path(inputs[0]).is_dir() \
        and (Path(inputs[0]).exists() or not any(c in inputs[0] for c in "*?[")) \
        and not Path(output).is_dir() and not str(output).endswith(("/", os.sep))
    output = Path(output)
    if single:
        _swap_one(Path(inputs[0]), output, only=only, mask=mask, dry_run=dry_run, progress_bar=tqdm, **swap)
    elif not inputs and list_file is None:
        raise CliError("name at least one input (a file, folder or pattern) or a --list file", 2)
    elif mask is not None:
        raise CliError("--mask applies to a single photo, not to a folder run", 2)
    elif output.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES and not output.is_dir():
        raise CliError(f"{output} names a file, but several inputs (a folder, a pattern or a list) go into a folder: "
                       "give a folder as OUT", 2)
    else:
        _swap_many(inputs, output, only=only, list_file=list_file, jobs=jobs, overwrite=overwrite, summary=summary,
                   dry_run=dry_run, progress_bar=tqdm, **swap)


def run_live(source: str, output: str, *, model: str, target: str, faces: str | None = None,
             references: list[Path] | None = None, match_threshold: float | None = None,
             keep_shape: float | None = None, input_format: str | None = None, input_options: list[str] | None = None,
             output_format: str | None = None, realtime: bool = False, timeout: float = 10.0, codec: str = "libx264",
             crf: int | None = 23, preset: str | None = None, max_frames: int | None = None, max_in_flight: int = 2,
             address: str = DEFAULT_ADDRESS, credentials: dict[str, Any] | None = None) -> None:
    """`facetwin live`: a live source to a live output until the source ends or Ctrl-C. Everything it prints goes to
    stderr: stdout may be the video. The first Ctrl-C (or SIGTERM) stops reading and ends the output properly once
    the frames in flight are written; a second stops at once, still ending the output where it can."""
    from tqdm import tqdm

    try:
        options = live_options(codec, crf=crf, preset=preset, max_frames=max_frames)
    except InvalidInputError as exc:
        raise CliError(exc.details, 2) from None
    pairs = {}
    for option in input_options or []:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise CliError(f"--input-option {option!r}: expected KEY=VALUE (an FFmpeg option: video_size=1280x720)", 2)
        pairs[key] = value
    stop, pressed = threading.Event(), []

    def graceful(signum: int, frame: Any) -> None:
        # The flag is a plain list, not the Event: a second signal can run this inside the first run's stop.set(),
        # which holds the Event's lock, and must not wait for it.
        if pressed:
            raise KeyboardInterrupt
        pressed.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, graceful) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with Client(address, **(credentials or {})) as client, \
                tqdm(unit="frame", desc=Path(source).name or source, disable=None) as bar:
            report = swap_live(client, source, output, model, target,
                               faces=parse_faces(faces, False, references, match_threshold), keep_shape=keep_shape,
                               options=options, input_format=input_format, input_options=pairs,
                               output_format=output_format, realtime=realtime, timeout_s=timeout or None,
                               max_in_flight=max_in_flight, progress=bar.update, cancel=stop)
    except KeyboardInterrupt:
        raise CliError("interrupted; the output was ended where it stopped", 130) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(_live_summary(report), file=sys.stderr)


def _live_summary(report: LiveReport) -> str:
    latency = (f", latency p50 {report.latency_ms_p50:.0f} ms / p99 {report.latency_ms_p99:.0f} ms"
               if report.latency_ms_p50 is not None else "")
    rate = report.frames_written / report.seconds if report.seconds else 0.0
    audio = f"; {report.audio_streams} audio stream(s) copied" if report.audio_streams else ""
    return (f"{report.ended}: wrote {report.output}: {report.frames_written} of "
            f"{report.frames_read} frame(s) read ({report.skipped} skipped for newer ones, {report.dropped} dropped "
            f"by the server), {report.faces_swapped} face(s) swapped{latency}, in {report.seconds:.1f} s "
            f"({rate:.1f} frames/s){audio}")


def _missing_cli_packages() -> list[str]:
    missing = []
    for module, package in (("typer", "typer"), ("tqdm", "tqdm"), ("av", "av")):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    return missing


def build_app() -> Any:
    """The typer application (imported here so the module imports without the cli extra)."""
    from typing import Annotated

    import typer

    app = typer.Typer(
        name="facetwin", help="Swap faces in photos and videos through a facetwin server.", add_completion=False,
        no_args_is_help=True, pretty_exceptions_enable=False,
    )
    Address = Annotated[str, typer.Option("--address", "-a", envvar=ADDRESS_ENV,
                                          help=f"Server host:port (env {ADDRESS_ENV}).", show_default=True)]

    Token = Annotated[str | None, typer.Option("--token", envvar="FACETWIN_TOKEN", show_default=False,
                                               help="Bearer token of a server that asks for one (env FACETWIN_TOKEN).")]
    TokenFile = Annotated[Path | None, typer.Option(
        "--token-file", envvar="FACETWIN_TOKEN_FILE", show_default=False,
        help="File holding the bearer token (env FACETWIN_TOKEN_FILE; keeps it out of the process list).")]
    CA = Annotated[Path | None, typer.Option("--ca", envvar="FACETWIN_CA", show_default=False,
                                             help="PEM of the CA that signed the server's certificate: TLS (env "
                                                  "FACETWIN_CA).")]
    Cert = Annotated[Path | None, typer.Option("--cert", envvar="FACETWIN_CERT", show_default=False,
                                               help="PEM client certificate, for mutual TLS (env FACETWIN_CERT).")]
    Key = Annotated[Path | None, typer.Option("--key", envvar="FACETWIN_KEY", show_default=False,
                                              help="PEM key of --cert (env FACETWIN_KEY).")]
    TLS = Annotated[bool, typer.Option("--tls", envvar="FACETWIN_TLS",
                                       help="TLS trusting the public CAs gRPC ships (a server with a public "
                                            "certificate); --ca implies TLS.")]

    # What swap, swap-video and live share.
    Model = Annotated[str, typer.Option("--model", "-m", help="Model bundle name (see `facetwin models`).")]
    Target = Annotated[str, typer.Option("--target", "-t", help="Target identity: the face to render.")]
    Faces = Annotated[str | None, typer.Option(
        "--faces", show_default=False, help="Which faces: largest (default), all, or a number (0 = largest).")]
    Reference = Annotated[list[Path] | None, typer.Option(
        "--reference", show_default=False,
        help="A photo of the person to swap (repeat for more photos of them): only faces the server finds to be that "
             "person are swapped.")]
    MatchThreshold = Annotated[float | None, typer.Option(
        "--match-threshold", min=0.01, max=1.0, show_default=False,
        help="With --reference: how alike a face must be (face-descriptor distance; default the server's, 0.6; lower "
             "is stricter).")]
    KeepShape = Annotated[float | None, typer.Option(
        "--keep-shape", min=0.0, max=1.0,
        help="0 = the target's face shape .. 1 = the original's (default: the server's, `facetwin info`).")]
    Codec = Annotated[str, typer.Option(
        "--codec", help="Video encoder (libx264 = H.264, plays in browsers; libx265, h264_nvenc ...).")]

    def credentials(token: str | None, token_file: Path | None, ca: Path | None, cert: Path | None,
                    key: Path | None, tls: bool) -> dict[str, Any]:
        if token and token_file:
            raise CliError("give --token or --token-file, not both", 2)
        if token_file is not None:
            try:
                token = token_file.read_text().strip()
            except OSError as exc:
                raise CliError(f"cannot read --token-file {token_file}: {exc.strerror}", 2) from None
        if (cert is None) != (key is None):
            raise CliError("--cert and --key go together (mutual TLS): give both or neither", 2)
        try:  # read here, so that a mistake names the option
            pems = {name: read_pem(path, flag, kind) if path is not None else None for name, path, flag, kind in (
                ("root_certificates", ca, "--ca", "CERTIFICATE"), ("client_certificate", cert, "--cert", "CERTIFICATE"),
                ("client_key", key, "--key", "PRIVATE KEY"))}
        except InvalidInputError as exc:
            raise CliError(exc.details, 2) from None
        return {"token": token or None, **pems, "tls": tls}

    def guarded(action: Any, address: str, auth: tuple, **kwargs: Any) -> None:
        try:
            action(address=address, credentials=credentials(*auth), **kwargs)
        except CliError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except FaceTwinError as exc:
            secure = bool(auth[5] or auth[2])  # --tls or --ca
            typer.echo(f"error: {_describe(exc, address, secure)}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("error: interrupted; no partial output was left", err=True)
            raise typer.Exit(130) from None

    @app.command()
    def models(address: Address = DEFAULT_ADDRESS, token: Token = None, token_file: TokenFile = None, ca: CA = None,
               cert: Cert = None, key: Key = None, tls: TLS = False) -> None:
        """List the models loaded on the server."""
        guarded(run_models, address, (token, token_file, ca, cert, key, tls))

    @app.command()
    def info(address: Address = DEFAULT_ADDRESS, as_json: bool = typer.Option(False, "--json", help="Print JSON."),
             token: Token = None, token_file: TokenFile = None, ca: CA = None, cert: Cert = None, key: Key = None,
             tls: TLS = False) -> None:
        """Show how the server is configured: version, TLS and tokens, stream defaults and every limit."""
        guarded(run_info, address, (token, token_file, ca, cert, key, tls), as_json=as_json)

    def swap_command(only: str | None, help_text: str, in_help: str) -> Any:
        def command(
            inputs: Annotated[list[Path] | None, typer.Argument(metavar="IN...", help=in_help, show_default=False)]
            = None,
            output: Annotated[str, typer.Argument(  # str: a trailing / (a folder) must survive
                metavar="OUT", help="Output file for one input (its suffix picks the format), else a folder.")]
            = ...,
            model: Model = ...,
            target: Target = ...,
            faces: Faces = None,
            reference: Reference = None,
            match_threshold: MatchThreshold = None,
            aligned: Annotated[bool, typer.Option(
                "--aligned", help="Inputs are aligned face crops (from facetwin-train extract): no face finding.")]
            = False,
            keep_shape: KeepShape = None,
            quality: Annotated[int | None, typer.Option(
                "--quality", min=1, max=100, help="JPEG quality of photo outputs (default 90).")] = None,
            mask: Annotated[Path | None, typer.Option(
                "--mask", help="One photo: also write the blend mask here (.png/.jpg).")] = None,
            codec: Codec = "libx264",
            crf: Annotated[int, typer.Option(
                "--crf", min=0, max=63, help="Video quality: lower is better and bigger (x264: 18 looks lossless).")]
            = 18,
            preset: Annotated[str | None, typer.Option(
                "--preset", help="Encoder speed (x264: ultrafast .. veryslow; default: the encoder's).")] = None,
            max_frames: Annotated[int | None, typer.Option(
                "--max-frames", min=1, help="Videos: stop after this many frames (audio cut to match).")] = None,
            max_in_flight: Annotated[int, typer.Option(
                "--max-in-flight", min=1, help="Video frames sent ahead of results.")] = 8,
            list_file: Annotated[Path | None, typer.Option(
                "--list", help="A file naming inputs, one per line (relative to the list's folder).")] = None,
            jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Files swapped at once (folder runs).")]
            = 2,
            overwrite: Annotated[bool, typer.Option(
                "--overwrite", help="Folder runs: swap files whose output exists (they are skipped otherwise).")]
            = False,
            summary: Annotated[Path | None, typer.Option(
                "--summary", help=f"Folder runs: where the JSON summary goes (default OUT/{SUMMARY_NAME}).")]
            = None,
            address: Address = DEFAULT_ADDRESS,
            token: Token = None,
            token_file: TokenFile = None,
            ca: CA = None,
            cert: Cert = None,
            key: Key = None,
            tls: TLS = False,
            dry_run: Annotated[bool, typer.Option(
                "--dry-run", help="Check the inputs and outputs and print what would be done; send nothing.")]
            = False,
        ) -> None:
            guarded(run_swap, address, (token, token_file, ca, cert, key, tls), inputs=inputs, output=output, model=model, target=target, only=only,
                    aligned=aligned, faces=faces, references=reference, match_threshold=match_threshold,
                    keep_shape=keep_shape, quality=quality, mask=mask, codec=codec,
                    crf=crf, preset=preset, max_frames=max_frames, max_in_flight=max_in_flight,
                    list_file=list_file, jobs=jobs, overwrite=overwrite, summary=summary, dry_run=dry_run)

        command.__doc__ = help_text
        return command

    @app.command()
    def live(
        source: Annotated[str, typer.Argument(
            metavar="SOURCE", help="- (standard input), an FFmpeg URL (rtsp://, udp://, srt://, http://), a camera "
                                   "(/dev/video0) or a file (with --realtime: played as a camera).")],
        output: Annotated[str, typer.Argument(
            metavar="OUT", help="- (standard output, MPEG-TS), an FFmpeg URL (udp://, srt://, rtmp://) or a file "
                                "(.ts, .mkv, .mp4, .flv).")],
        model: Model = ...,
        target: Target = ...,
        faces: Faces = None,
        reference: Reference = None,
        match_threshold: MatchThreshold = None,
        keep_shape: KeepShape = None,
        input_format: Annotated[str | None, typer.Option(
            "--input-format", show_default=False,
            help="FFmpeg's demuxer for SOURCE where it cannot be guessed (mpegts, v4l2, ...).")] = None,
        input_option: Annotated[list[str] | None, typer.Option(
            "--input-option", show_default=False,
            help="KEY=VALUE for FFmpeg's demuxer or protocol (video_size=1280x720, framerate=30, "
                 "rtsp_transport=tcp); repeat it.")] = None,
        output_format: Annotated[str | None, typer.Option(
            "--format", show_default=False,
            help="OUT's container where its name does not tell it (mpegts, flv, matroska, ...).")] = None,
        realtime: Annotated[bool, typer.Option(
            "--realtime", help="Read SOURCE at its own frame rate, as a camera delivers it (for files).")] = False,
        timeout: Annotated[float, typer.Option(
            "--timeout", min=0, help="Seconds SOURCE may send nothing (opening it, then between packets) before the "
                                     "run ends (0: wait for ever).")] = 10.0,
        codec: Codec = "libx264",
        crf: Annotated[int, typer.Option("--crf", min=0, max=63, help="Video quality: lower is better and bigger.")]
        = 23,
        preset: Annotated[str | None, typer.Option(
            "--preset", show_default=False, help="Encoder speed (x264: ultrafast .. veryslow; default veryfast).")]
        = None,
        max_frames: Annotated[int | None, typer.Option(
            "--max-frames", min=1, help="Stop after this many frames read.")] = None,
        max_in_flight: Annotated[int, typer.Option(
            "--max-in-flight", min=1, help="Frames sent ahead of results: more keeps a distant server busy, fewer "
                                           "keeps the latency down.")] = 2,
        address: Address = DEFAULT_ADDRESS,
        token: Token = None,
        token_file: TokenFile = None,
        ca: CA = None,
        cert: Cert = None,
        key: Key = None,
        tls: TLS = False,
    ) -> None:
        """Swap the faces of a live video (a camera, a stream, a pipe) as it plays, until it ends or Ctrl-C."""
        guarded(run_live, address, (token, token_file, ca, cert, key, tls), source=source, output=output,
                model=model, target=target, faces=faces, references=reference, match_threshold=match_threshold,
                keep_shape=keep_shape, input_format=input_format, input_options=input_option,
                output_format=output_format, realtime=realtime, timeout=timeout, codec=codec, crf=crf, preset=preset,
                max_frames=max_frames, max_in_flight=max_in_flight)

    app.command("swap")(swap_command(
        None, "Swap the faces in photos and videos: one file to OUT, or folders, patterns and --list into folder OUT.",
        "Photos, videos, folders of them, or quoted patterns ('shots/*.jpg').",
    ))
    app.command("swap-video")(swap_command(
        "video", "Swap the faces in videos: one file to OUT, or folders, patterns and --list into folder OUT.",
        "Videos, folders of them, or quoted patterns ('clips/*.mp4').",
    ))
    return app


def main() -> None:
    """Console entry point `facetwin`."""
    missing = _missing_cli_packages()
    if missing:
        print(
            f"error: the facetwin command needs {', '.join(missing)}: install facetwin[cli] "
            "(pip install 'facetwin[cli]')",
            file=sys.stderr,
        )
        sys.exit(2)
    # SIGTERM (timeout, docker stop, systemd) stops the work like Ctrl-C: no partial output is left either way.
    signal.signal(signal.SIGTERM, _interrupt)
    build_app()(prog_name="facetwin")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
