#!/usr/bin/env python3
"""Served vs raw throughput of a model bundle, in one run, on this machine.

Measures, for the same bundle and target:
  raw      the backend called directly (no gRPC, no codecs) at batch 1 and at the server's max batch;
  unary    `Swap` calls from one asyncio client with --concurrency calls in flight;
  stream   one `SwapStream` pushing frames as fast as the server's window allows;
  latency  sequential unary calls (one in flight): p50 / p99.
The server runs as a real `facetwin-server serve` subprocess on loopback. Prints JSON (and writes it with --json).

    python bench/serve.py --model-dir out/models --json out/bench_serve.json
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
           "--max-queue", "4096", "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd)
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


def main() -> None:
    args = parse_args()
    bundle = pick_bundle(Path(args.model_dir), args.model)
    manifest = load_manifest(bundle)
    model, target, res = bundle.name, manifest.identities[-1], manifest.resolution
    print(f"bundle {model}: {res} px, target {target}, backend {args.backend}", file=sys.stderr)

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
