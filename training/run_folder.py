"""What a training run folder holds, and the summary `train()` leaves in it.

Pure standard library (plus core.files): the examples and benches read a run's results from here without
importing torch.

    checkpoint.pt        config, weights, optimizer state, step (checkpoint.py; loaded without pickle)
    config.json          the effective TrainConfig, for people
    train_summary.json   the latest train() call, as far as the checkpoint beside it: steps, seconds, losses, why
                         it stopped (TrainSummary)
    previews/            step_<N>.png preview grids (previews.py)
    events.out.tfevents.*  TensorBoard scalars
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from facetwin.core.files import atomic_write_bytes

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.json"
SUMMARY_NAME = "train_summary.json"
PREVIEW_DIR = "previews"  # preview grids go to <run>/previews/step_<N>.png
# TrainSummary.stopped: why a train() call ended. None while it runs, and for good when it was killed or failed.
STOPPED_AT_STEPS = "steps"  # the run reached its configured steps
STOPPED_AT_TIME_BUDGET = "time budget"  # max_seconds ran out first; --resume continues
STOPPED_AT_INTERRUPT = "interrupted"  # Ctrl-C (SIGINT): the step in flight finished and was saved; --resume continues


@dataclasses.dataclass(frozen=True)
class TrainSummary:
    """One train() call, written next to the checkpoint each time a checkpoint is written and once the call ends, so
    it always describes the checkpoint beside it."""

    checkpoint: str  # path of the checkpoint this summary describes ("" before a new run's first one)
    variant: str  # ae, vae, vae-gan or cyclegan
    precision: str  # "float32", or the autocast dtype: "bfloat16 autocast", "float16 autocast"
    world_size: int  # processes training together (torchrun); batch_size is per process
    steps: int  # the run's configured total steps (a resume continues towards this)
    step_start: int  # the checkpoint's step when this call began (0: a new run)
    step_end: int  # the checkpoint's step now
    seconds: float  # the training loop's own time to step_end: no start-up, data loading or final barrier
    losses: dict[str, float]  # the loss terms (and grad_norm) at the last logged step, averaged over identities
    stopped: str | None  # STOPPED_AT_STEPS, _TIME_BUDGET, _INTERRUPT, or None: still running, or killed

    @property
    def steps_trained(self) -> int:
        return self.step_end - self.step_start

    @property
    def steps_per_second(self) -> float | None:
        return self.steps_trained / self.seconds if self.seconds > 0 else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, with the derived steps_trained and steps_per_second spelled out for readers."""
        per_second = self.steps_per_second
        return {**dataclasses.asdict(self), "steps_trained": self.steps_trained,
                "steps_per_second": None if per_second is None else round(per_second, 3)}


def write_summary(run_dir: str | Path, summary: TrainSummary) -> Path:
    """Atomically: a reader never sees half a summary."""
    path = Path(run_dir) / SUMMARY_NAME
    atomic_write_bytes(path, (json.dumps(summary.to_dict(), indent=2) + "\n").encode())
    return path


def read_summary(run_dir: str | Path) -> TrainSummary | None:
    """The summary in run_dir; None when there is none (no train() call has written one there)."""
    path = Path(run_dir) / SUMMARY_NAME
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    fields = {field.name for field in dataclasses.fields(TrainSummary)}
    try:
        return TrainSummary(**{key: value for key, value in data.items() if key in fields})
    except TypeError as exc:
        raise ValueError(f"{path} is not a training summary: {exc}") from exc
