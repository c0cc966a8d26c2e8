#!/usr/bin/env python3
"""Frame memory: the serving process's peak resident memory under a burst of large images, with and without
--frame-memory-mb, in one run.

Unary kinds (aligned, full): each call sends the same PNG, a flat grey image with a stripe every 7th row, 4096x4096
by default, which compresses to about 60 KB and decodes to 48 MiB; all calls are sent at once from one client (the
per-client limits are off). Kind stream: --streams streams each send --frames raw frames of that image (48 MiB
each: the request bytes are the pixels) as fast as the server reads them. Reported per setting: the server's peak
resident memory (VmHWM) and its growth over the idle server, the burst's wall time, and each call's (or frame's)
status; `growth_vs_unbounded` is the growth against the first setting's.

    python bench/memory.py --model-dir out/models --calls 64 --json out/bench_memory.json
    python bench/memory.py --model-dir out/models --kind stream --streams 4 --frames 12
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import grpc
import numpy as np

from facetwin.core.bundle import BundleError, load_manifest, pick_bundle
from facetwin.v1 import facetwin_pb2 as pb
from facetwin.v1 import facetwin_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import CHANNEL_OPTIONS  # noqa: E402  (bench/load.py)
from report import host_info, write_report  # noqa: E402  (bench/report.py)
from serve import start_server, stop_server  # noqa: E402  (bench/serve.py)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="out/models", help="folder of bundles (make demo writes out/models)")
    p.add_argument("--model", default=None, help="bundle name (default: the first one)")
    p.add_argument("--calls", type=int, default=64, help="calls sent at once")
    p.add_argument("--side", type=int, default=4096, help="the image's side, pixels")
    p.add_argument("--kind", choices=("aligned", "full", "stream"), default="aligned",
                   help="unary calls of the image as an aligned face or as a full frame (face detection on it), or "
                        "streams of it as raw aligned faces")
    p.add_argument("--streams", type=int, default=4, help="--kind stream: streams at once")
    p.add_argument("--frames", type=int, default=12, help="--kind stream: frames per stream")
    p.add_argument("--frame-memory-mb", default="0,1024",
                   help="settings to compare, comma-separated; the first is the baseline (0: no limit)")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--json", dest="json_path", default=None, help="also write the report here")
    args = p.parse_args()
    args.max_batch, args.max_delay_ms, args.inference_workers = 16, 2.0, 0  # start_server's settings
    args.detect_threads, args.keep_shape = 1, None
    return args


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc: Linux only")


def test_image(side: int) -> bytes:
    image = np.full((side, side, 3), 128, np.uint8)
    image[::7] = 30
    return cv2.imencode(".png", image)[1].tobytes()


def burst(address: str, request: pb.SwapRequest, calls: int) -> tuple[float, dict[str, int]]:
    """Sends `calls` copies of the request at once; (seconds until the last answer, status name -> count)."""
    codes: dict[str, int] = {}
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.FaceSwapStub(channel)
        start = time.perf_counter()
        futures = [stub.Swap.future(request, timeout=600) for _ in range(calls)]
        for future in futures:
            try:
                future.result()
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            codes[code] = codes.get(code, 0) + 1
        return time.perf_counter() - start, codes


def stream_burst(address: str, request: pb.SwapRequest, streams: int, frames: int) -> tuple[float, dict[str, int]]:
    """`streams` streams of `frames` copies of the request at once; (seconds until the last answer, frame status or
    stream error -> count)."""
    codes: dict[str, int] = {}
    messages = [pb.SwapStreamRequest(request=request, policy=pb.STREAM_POLICY_QUEUE)] + \
        [pb.SwapStreamRequest(request=request)] * (frames - 1)
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.FaceSwapStub(channel)
        start = time.perf_counter()
        calls = [stub.SwapStream(iter(messages), timeout=600) for _ in range(streams)]
        for call in calls:
            try:
                for reply in call:
                    code = pb.FrameStatus.Name(reply.status)
                    codes[code] = codes.get(code, 0) + 1
            except grpc.RpcError as exc:
                codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
        return time.perf_counter() - start, codes


def main() -> None:
    args = parse_args()
    model_dir = Path(args.model_dir)
    try:
        bundle = pick_bundle(model_dir, args.model)
        manifest, name = load_manifest(bundle), bundle.name
    except BundleError as exc:
        sys.exit(f"error: {exc}")
    png = test_image(args.side)
    request = pb.SwapRequest(model=name, target=manifest.identities[-1], image=pb.Image(encoded=png),
                             output_encoding=pb.ENCODING_JPEG,
                             kind=pb.IMAGE_KIND_FULL_FRAME if args.kind == "full" else pb.IMAGE_KIND_ALIGNED_FACE)
    if args.kind == "stream":
        pixels = cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        request.image.CopyFrom(pb.Image(raw=pb.RawImage(pixels=pixels.tobytes(), height=args.side, width=args.side,
                                                        channels=3, color_order=pb.COLOR_ORDER_RGB)))
    settings = [int(v) for v in args.frame_memory_mb.split(",")]
    runs = []
    for setting in settings:
        what = f"{args.streams} streams of {args.frames}" if args.kind == "stream" else f"{args.calls} calls of"
        print(f"--frame-memory-mb {setting}: {what} {args.side}x{args.side} ...", file=sys.stderr)
        # The largest image the server takes is this one, and its reference photos (none here) are small: a frame
        # memory of about one such image (3 x side^2 bytes) is valid.
        args.server_args = ["--frame-memory-mb", str(setting), "--max-image-side", str(args.side),
                            "--max-image-pixels", str(args.side ** 2), "--max-reference-side", "64"]
        proc, address = start_server(args, model_dir)
        try:
            idle_mb = peak_rss_mb(proc.pid)
            if args.kind == "stream":
                seconds, codes = stream_burst(address, request, args.streams, args.frames)
            else:
                seconds, codes = burst(address, request, args.calls)
            peak_mb = peak_rss_mb(proc.pid)
        finally:
            stop_server(proc)
        runs.append({"frame_memory_mb": setting, "idle_mb": round(idle_mb),
                     "peak_mb": round(peak_mb), "growth_mb": round(peak_mb - idle_mb), "seconds": round(seconds, 2),
                     "codes": codes})
    for run in runs:
        run["growth_vs_unbounded"] = round(run["growth_mb"] / max(runs[0]["growth_mb"], 1), 3)
    report = {"bench": "memory", "date": time.strftime("%Y-%m-%d"), "host": host_info(), "model": name,
              "image": {"side": args.side, "png_bytes": len(png), "decoded_mib": round(3 * args.side ** 2 / 2**20, 1),
                        "kind": args.kind},
              "calls": args.calls if args.kind != "stream" else None,
              "streams": [args.streams, args.frames] if args.kind == "stream" else None, "runs": runs}
    write_report(report, args.json_path)


if __name__ == "__main__":
    main()
