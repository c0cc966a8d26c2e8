"""Preview grids: what the model makes of a few fixed faces, as a PNG in the run folder every preview_every steps.

Rows, per source identity X: X's faces, X -> X, then X -> Y for every other identity Y. Columns: X's first
PREVIEW_FACES faces, un-augmented, so grids of successive steps compare.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from facetwin.core.files import atomic_write_bytes
from facetwin.training.data import IdentityFaces
from facetwin.training.run_folder import PREVIEW_DIR

PREVIEW_FACES = 6  # columns of a preview grid


def preview_grid(model: nn.Module, faces: dict[str, IdentityFaces], count: int = PREVIEW_FACES) -> np.ndarray:
    """uint8 RGB grid (H, W, 3) of the rows above; short identities are padded with black."""
    was_training = model.training
    model.eval()
    rows = []
    with torch.no_grad():
        for source, data in faces.items():
            x = data.faces[:count].float() / 255.0  # (n, 3, R, R)
            rows.append(x)
            rows.extend(model(x, target)[0].float() for target in [source, *(n for n in faces if n != source)])
    model.train(was_training)
    side = rows[0].shape[-1]
    strips = [torch.cat([*row, *[torch.zeros(3, side, side, device=row.device)] * (count - len(row))], dim=2)
              for row in rows]  # each (3, R, count*R)
    grid = torch.cat(strips, dim=1)  # (3, rows*R, count*R)
    return (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def write_preview(run_dir: Path, step: int, rgb: np.ndarray) -> Path:
    """<run_dir>/previews/step_<step>.png, written atomically."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("cv2.imencode failed to encode a PNG")
    path = run_dir / PREVIEW_DIR / f"step_{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data.tobytes())
    return path
