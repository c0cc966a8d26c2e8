"""The `facetwin` command line: list models, swap an image file, swap a video, through a facetwin server.

Needs the `cli` extra (typer, tqdm, OpenCV); the SDK itself does not. Expected failures (server
unreachable, unknown model, unreadable file) print one `error: ...` line and exit 1; usage mistakes
exit 2; nothing prints a traceback.
"""

import importlib
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .client import DEFAULT_ADDRESS, Client
from .errors import FaceTwinError, NotFoundError, UnavailableError
from .images import build_swap_request, sniff_format

ADDRESS_ENV = "FACETWIN_ADDRESS"
_IMAGE_ENCODINGS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}
_VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov")  # containers that take the mp4v codec
_DRY_RUN_FRAMES = 3  # frames a video dry run reads and validates: enough to catch a bad file, still instant
_FALLBACK_FPS = 25.0  # when the container does not state a frame rate


class CliError(Exception):
    """An expected failure: printed as one `error: ...` line, exit code `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _describe(err: FaceTwinError, address: str) -> str:
    details = " ".join(err.details.split())  # gRPC details can span lines; the CLI prints one
    if isinstance(err, UnavailableError):
        return f"server at {address} is unavailable ({details})"
    if isinstance(err, NotFoundError):
        return f"{details} (list what is loaded with: facetwin models --address {address})"
    return f"{err.code.name}: {details}"


def _cv2() -> Any:
    """OpenCV with its stderr logging off: the CLI reports every failure itself, as one line."""
    # FFmpeg's own log level is read once, when OpenCV first opens a video; -8 is AV_LOG_QUIET.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    return cv2


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None


def _write_bytes(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None


def _image_encoding(path: Path, what: str) -> str:
    try:
        return _IMAGE_ENCODINGS[path.suffix.lower()]
    except KeyError:
        raise CliError(f"{what} {path} must end in .png, .jpg or .jpeg (it picks the encoding)", 2) from None


def run_models(address: str) -> None:
    """Prints a table of the models loaded on the server."""
    with Client(address) as client:
        models = client.list_models()
    if not models:
        print(f"no models loaded at {address}")
        return
    header = ("NAME", "IDENTITIES", "RESOLUTION", "BACKEND", "STATUS")
    rows = [(m.name, ",".join(m.identities), str(m.resolution), m.backend, m.status) for m in models]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    for m in models:
        if m.error:
            print(f"{m.name}: {m.error}")


def _reencode(data: bytes, encoding: str) -> bytes:
    """Converts PNG/JPEG bytes to `encoding` (the mask comes back in the image's encoding)."""
    import numpy as np

    cv2 = _cv2()
    if sniff_format(data) == encoding:
        return data
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    ok, buf = cv2.imencode(".png" if encoding == "png" else ".jpg", image) if image is not None else (False, None)
    if not ok:
        raise CliError(f"could not convert the server's mask to {encoding}")
    return buf.tobytes()


def run_swap(
    input_path: Path, output: Path, *, model: str, target: str, mask: Path | None, address: str, dry_run: bool
) -> None:
    """Sends IN's file bytes as they are (the server decodes) and writes the PNG/JPEG it returns."""
    import numpy as np

    cv2 = _cv2()
    encoding = _image_encoding(output, "OUT")
    mask_encoding = _image_encoding(mask, "--mask") if mask is not None else None
    data = _read_bytes(input_path)
    if sniff_format(data) is None:
        raise CliError(f"{input_path} is not a PNG or JPEG file")
    request = build_swap_request(data, model, target, color="rgb", return_mask=mask is not None, encoding=encoding)
    if dry_run:
        # Decode locally only here, to prove the file is whole; the real run lets the server decode.
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise CliError(f"{input_path} is not a decodable PNG or JPEG file")
        height, width = image.shape[:2]
        print(
            f"dry run: would send {input_path} ({sniff_format(data).upper()} {width}x{height}, {len(data)} bytes; "
            f"request {request.ByteSize()} bytes) to {address}: model={model} target={target}, "
            f"result as {encoding} -> {output}" + (f", mask -> {mask}" if mask is not None else "")
        )
        return
    started = time.perf_counter()
    with Client(address) as client:
        result = client.swap(data, model, target, color="rgb", return_mask=mask is not None, encoding=encoding)
    if result.encoded is None:
        raise CliError(f"the server at {address} returned no {encoding} image")
    _write_bytes(output, result.encoded)
    if mask is not None:
        if result.encoded_mask is None:
            raise CliError(f"the server at {address} returned no mask")
        _write_bytes(mask, _reencode(result.encoded_mask, mask_encoding))
    elapsed_ms = (time.perf_counter() - started) * 1000
    print(f"wrote {output} ({len(result.encoded)} bytes) in {elapsed_ms:.0f} ms "
          f"(server {result.timings.total_ms:.1f} ms)")


def _open_video(path: Path) -> Any:
    cv2 = _cv2()
    if not path.is_file():
        raise CliError(f"cannot read {path}: no such file")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise CliError(f"cannot read {path}: OpenCV cannot open it as a video")
    return capture


def run_swap_video(
    input_path: Path, output: Path, *, model: str, target: str, address: str, max_frames: int | None,
    max_in_flight: int, dry_run: bool,
) -> None:
    """Streams IN's frames (BGR raw) through Client.stream and writes the results as mp4v at IN's frame rate.

    Each frame must show an aligned face; frames the server drops are written unchanged to keep the timing.
    """
    from tqdm import tqdm

    cv2 = _cv2()
    if output.suffix.lower() not in _VIDEO_SUFFIXES:
        raise CliError(f"OUT {output} must end in {', '.join(_VIDEO_SUFFIXES)} (written with the mp4v codec)", 2)
    if max_frames is not None and max_frames < 1:
        raise CliError(f"--max-frames must be at least 1, got {max_frames}", 2)
    capture = _open_video(input_path)
    fps = capture.get(cv2.CAP_PROP_FPS)
    fps = fps if fps and fps > 0 else _FALLBACK_FPS
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    total = count if count > 0 else None  # some containers do not state their length
    if max_frames is not None:
        total = min(total, max_frames) if total else max_frames
    limit = max_frames if max_frames is not None else float("inf")
    originals: deque[Any] = deque()  # frames sent and not yet answered, to stand in for dropped ones

    def frames() -> Iterator[Any]:
        read = 0
        while read < limit:
            ok, frame = capture.read()
            if not ok:
                return
            read += 1
            originals.append(frame)
            yield frame

    try:
        if dry_run:
            sample = [frame for _, frame in zip(range(_DRY_RUN_FRAMES), frames())]
            if not sample:
                raise CliError(f"{input_path} has no readable frames")
            requests = [build_swap_request(f, model, target, color="bgr", frame_id=i) for i, f in enumerate(sample)]
            height, width = sample[0].shape[:2]
            print(
                f"dry run: would stream {total or 'all'} frames of {input_path} ({width}x{height} BGR raw, "
                f"{sample[0].nbytes} pixel bytes, {requests[0].ByteSize()} bytes per request, {fps:g} fps; "
                f"checked {len(sample)}) to {address}: model={model} target={target} -> {output} (mp4v)"
            )
            return
        _stream_video(frames(), originals, output, fps, total, model=model, target=target, address=address,
                      max_in_flight=max_in_flight, progress=tqdm)
    finally:
        capture.release()


def _stream_video(
    frames: Iterator[Any], originals: deque[Any], output: Path, fps: float, total: int | None, *, model: str,
    target: str, address: str, max_in_flight: int, progress: Any,
) -> None:
    cv2 = _cv2()
    writer = None
    written = dropped = 0
    server_ms = 0.0
    started = time.perf_counter()
    try:
        with Client(address) as client:
            results = client.stream(frames, model, target, color="bgr", max_in_flight=max_in_flight)
            for result in progress(results, total=total, unit="frame", disable=None):
                original = originals.popleft()
                image = original if result.dropped else result.image
                if writer is None:
                    output.parent.mkdir(parents=True, exist_ok=True)
                    height, width = original.shape[:2]
                    writer = cv2.VideoWriter(str(output), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
                    if not writer.isOpened():
                        raise CliError(f"cannot write {output}: OpenCV cannot open an mp4v writer there")
                if image.shape != original.shape:
                    raise CliError(f"server returned a {image.shape} frame for a {original.shape} one")
                writer.write(image)
                written += 1
                dropped += result.dropped
                server_ms += result.timings.total_ms
    except BaseException:
        if writer is not None:
            writer.release()
            writer = None
            output.unlink(missing_ok=True)  # a truncated video is worse than none
        raise
    finally:
        if writer is not None:
            writer.release()
    if written == 0:
        raise CliError("the input has no readable frames")
    elapsed = time.perf_counter() - started
    print(
        f"wrote {output}: {written} frames ({dropped} dropped) in {elapsed:.1f} s ({written / elapsed:.1f} fps), "
        f"server {server_ms / max(written - dropped, 1):.1f} ms/frame"
    )


def _missing_cli_packages() -> list[str]:
    missing = []
    for module, package in (("typer", "typer"), ("tqdm", "tqdm"), ("cv2", "opencv-python-headless")):
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
        name="facetwin", help="Swap faces through a facetwin server.", add_completion=False,
        no_args_is_help=True, pretty_exceptions_enable=False,
    )
    address_option = typer.Option(
        "--address", "-a", envvar=ADDRESS_ENV, help=f"Server host:port (env {ADDRESS_ENV}).", show_default=True
    )
    Address = Annotated[str, address_option]
    Model = Annotated[str, typer.Option("--model", "-m", help="Model bundle name (see `facetwin models`).")]
    Target = Annotated[str, typer.Option("--target", "-t", help="Target identity: the face to render.")]
    DryRun = Annotated[
        bool, typer.Option("--dry-run", help="Read and validate the input, print the request, send nothing.")
    ]

    def guarded(action: Any, address: str, **kwargs: Any) -> None:
        try:
            action(address=address, **kwargs)
        except CliError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except FaceTwinError as exc:
            typer.echo(f"error: {_describe(exc, address)}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("error: interrupted", err=True)
            raise typer.Exit(130) from None

    @app.command()
    def models(address: Address = DEFAULT_ADDRESS) -> None:
        """List the models loaded on the server."""
        guarded(run_models, address)

    @app.command()
    def swap(
        input_path: Annotated[Path, typer.Argument(metavar="IN", help="Aligned face, PNG or JPEG.")],
        output: Annotated[Path, typer.Argument(metavar="OUT", help="Result; .png or .jpg picks the encoding.")],
        model: Model,
        target: Target,
        mask: Annotated[Path | None, typer.Option("--mask", help="Also write the face mask here (.png/.jpg).")] = None,
        address: Address = DEFAULT_ADDRESS,
        dry_run: DryRun = False,
    ) -> None:
        """Swap the face in one image file."""
        guarded(run_swap, address, input_path=input_path, output=output, model=model, target=target, mask=mask,
                dry_run=dry_run)

    @app.command("swap-video")
    def swap_video(
        input_path: Annotated[Path, typer.Argument(metavar="IN", help="Video whose frames show an aligned face.")],
        output: Annotated[Path, typer.Argument(metavar="OUT", help="Result video (.mp4, mp4v codec, IN's fps).")],
        model: Model,
        target: Target,
        address: Address = DEFAULT_ADDRESS,
        max_frames: Annotated[int | None, typer.Option("--max-frames", help="Stop after this many frames.")] = None,
        max_in_flight: Annotated[int, typer.Option("--max-in-flight", min=1, help="Frames sent ahead of results.")] = 8,
        dry_run: DryRun = False,
    ) -> None:
        """Swap the face in every frame of a video, streaming the frames to the server."""
        guarded(run_swap_video, address, input_path=input_path, output=output, model=model, target=target,
                max_frames=max_frames, max_in_flight=max_in_flight, dry_run=dry_run)

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
    build_app()(prog_name="facetwin")


if __name__ == "__main__":
    main()
