"""Packaging promises: generated code is fresh, and a client-only install stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"
GENERATED = ("facetwin_pb2.py", "facetwin_pb2.pyi", "facetwin_pb2_grpc.py")


def test_generated_code_matches_the_proto(tmp_path):
    """`make proto` output is committed; this fails when someone edits the .proto and forgets to regenerate."""
    from grpc_tools import protoc

    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}", str(PROTO_DIR / "facetwin/v1/facetwin.proto")]
    assert protoc.main(args) == 0
    for name in GENERATED:
        fresh = (tmp_path / "facetwin/v1" / name).read_text()
        committed = (PROTO_DIR / "facetwin/v1" / name).read_text()
        assert fresh == committed, f"proto/facetwin/v1/{name} is stale: run `make proto`"


@pytest.mark.slow
def test_client_only_install_has_no_torch_or_onnxruntime(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", str(ROOT)], capture_output=True, text=True,
                             timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    listing = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                             check=True).stdout.lower()
    for heavy in ("torch", "onnxruntime", "onnx", "opencv"):
        assert f"\n{heavy}" not in "\n" + listing, f"client-only install pulled {heavy}"
    probe = ("import facetwin.client as c, sys; "
             "assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules and 'cv2' not in sys.modules; "
             "print(sorted(c.__all__))")
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Client" in result.stdout and "AsyncClient" in result.stdout
    for command, extra in (("facetwin-server", "server"), ("facetwin-train", "training"), ("facetwin", "cli")):
        run = subprocess.run([str(venv / "bin" / command), "--help"], capture_output=True, text=True, cwd=tmp_path)
        assert run.returncode == 2 and f"install facetwin[{extra}]" in run.stderr, (command, run.stderr)
        assert "Traceback" not in run.stderr
