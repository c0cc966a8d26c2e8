#!/usr/bin/env python3
"""Soak: many concurrent streams against one model for a long time, with push-back (STREAM_POLICY_QUEUE).

Every stream sends aligned faces as fast as the server reads them, for --seconds. Reported: frames sent and
answered per stream (lost = sent - answered, must be 0), frames answered with an error or dropped (must be 0),
round-trip latency per minute (p50, p99) and its drift (last minute's p50 against the first's), and the server's
resident memory over time and its growth after the first minute (warm-up) to the end. The goals: no error, no lost
frame, drift and RSS growth under 5 %.

With --reload-every S, a copy of the bundle gets a new version (its manifest rewritten, the weights the same) every S
seconds and the server is sent SIGHUP: the new version loads beside the one serving and takes over. Also reported:
the reloads and the versions that answered (each reload's must answer); no frame may fail meanwhile, and the memory
of the versions replaced must be freed (RSS growth under 5 % over all the reloads).

    python bench/soak.py --model-dir out/models --streams 32 --seconds 600 --json out/bench_soak.json
    python bench/soak.py --model-dir out/models --streams 32 --seconds 600 --reload-every 20
    python bench/soak.py --model-dir out/models --streams 4 --seconds 5          # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from facetwin.core.bundle import BundleError, load_manifest, manifest_sha256, pick_bundle
from facetwin.v1 import facetwin_pb2 as pb
from facetwin.v1 import facetwin_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import CHANNEL_OPTIONS  # noqa: E402  (bench/load.py)
from report import host_info, write_report  # noqa: E402  (bench/report.py)
from serve import make_request, start_server, stop_server  # noqa: E402  (bench/serve.py)

WINDOW_S = 60.0  # latency is summarised per window of this many seconds
RSS_EVERY_S = 5.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="out/models", help="folder of bundles (make demo writes out/models)")
    p.add_argument("--model", default=None, help="bundle name (default: the first one)")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--in-flight", type=int, default=8, help="frames each stream keeps outstanding")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-delay-ms", type=float, default=2.0)
    p.add_argument("--inference-workers", type=int, default=0)
    p.add_argument("--reload-every", type=float, default=0.0,
                   help="seconds between new versions of the bundle, each served after a SIGHUP (0: none)")
    p.add_argument("--json", dest="json_path", default=None, help="also write the report here")
    args = p.parse_args()
    args.detect_threads, args.keep_shape = 1, None  # start_server's full-frame settings: unused here
    return args


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Tally:
    """What every stream saw, on the client's event loop."""

    def __init__(self, streams: int) -> None:
        self.sent = [0] * streams
        self.answered = [0] * streams
        self.errors: list[str] = []  # FRAME_STATUS_ERROR / DROPPED frames and stream failures, described
        self.latencies: list[tuple[float, float]] = []  # (seconds since start, round trip ms)
        self.versions: collections.Counter[str] = collections.Counter()  # manifest sha256 -> frames it answered


async def one_stream(index: int, address: str, request: pb.SwapRequest, in_flight: int, stop_at: float,
                     started: float, tally: Tally) -> None:
    slots = asyncio.Semaphore(in_flight)
    sent_at: dict[int, float] = {}

    async def frames():
        frame_id = 0
        while time.monotonic() < stop_at:
            await slots.acquire()
            message = pb.SwapStreamRequest(policy=pb.STREAM_POLICY_QUEUE if frame_id == 0 else 0)
            message.request.CopyFrom(request)
            message.request.frame_id = frame_id
            sent_at[frame_id] = time.monotonic()
            tally.sent[index] += 1
            frame_id += 1
            yield message

    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        try:
            async for reply in pb_grpc.FaceSwapStub(channel).SwapStream(frames()):
                now = time.monotonic()
                slots.release()
                tally.answered[index] += 1
                frame_id = reply.response.frame_id
                if reply.status != pb.FRAME_STATUS_OK:
                    tally.errors.append(f"stream {index} frame {frame_id}: {pb.FrameStatus.Name(reply.status)} "
                                        f"{reply.error.code_name} {reply.error.message}")
                else:
                    tally.versions[reply.response.provenance.manifest_sha256] += 1
                tally.latencies.append((now - started, (now - sent_at.pop(frame_id)) * 1e3))
        except grpc.RpcError as err:
            tally.errors.append(f"stream {index} ended: {err.code().name} {err.details()}")


async def soak(args: argparse.Namespace, address: str, request: pb.SwapRequest) -> Tally:
    tally = Tally(args.streams)
    started = time.monotonic()
    stop_at = started + args.seconds
    await asyncio.gather(*(one_stream(i, address, request, args.in_flight, stop_at, started, tally)
                           for i in range(args.streams)))
    return tally


def summarise_latency(latencies: list[tuple[float, float]], seconds: float) -> list[dict]:
    windows = []
    times = np.array([t for t, _ in latencies])
    values = np.array([ms for _, ms in latencies])
    for start in np.arange(0.0, max(seconds, 1e-9), min(WINDOW_S, seconds)):
        inside = values[(times >= start) & (times < start + min(WINDOW_S, seconds))]
        if len(inside):
            windows.append({"from_s": float(start), "frames": int(len(inside)),
                            "p50_ms": float(np.percentile(inside, 50)), "p99_ms": float(np.percentile(inside, 99))})
    return windows


def new_versions(bundle: Path, proc: subprocess.Popen, every_s: float, done: threading.Event,
                 made: list[str], rss_before: list[int]) -> None:
    """Every every_s seconds: the server's RSS noted (between two reloads: the memory a reload leaves behind, not
    the two versions held while one loads), the bundle's manifest rewritten (the export check's error nudged, so its
    sha256 changes and the weights stay), then SIGHUP."""
    path = bundle / "manifest.json"
    while not done.wait(every_s):
        rss = rss_bytes(proc.pid)
        if rss is not None:
            rss_before.append(rss)
        manifest = json.loads(path.read_text())
        manifest["export"]["max_abs_error"] = float(manifest["export"]["max_abs_error"]) + 1e-9
        partial = bundle.parent / ".manifest.partial"
        partial.write_text(json.dumps(manifest, indent=2))
        partial.replace(path)
        made.append(manifest_sha256(bundle))
        proc.send_signal(signal.SIGHUP)


def main() -> None:
    args = parse_args()
    try:
        bundle = pick_bundle(args.model_dir, args.model)
    except BundleError as exc:
        sys.exit(f"error: {exc}")
    manifest = load_manifest(bundle)
    request = make_request(bundle.name, manifest.identities[-1], manifest.resolution)
    scratch = None
    if args.reload_every:  # versions are made in a copy: the caller's bundle stays as it is
        scratch = Path(tempfile.mkdtemp(prefix="facetwin-soak-"))
        bundle = Path(shutil.copytree(bundle, scratch / bundle.name))
    made = [manifest_sha256(bundle)]
    rss_before: list[int] = []
    proc, address = start_server(args, bundle.parent)
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def watch_memory() -> None:
        t0 = time.monotonic()
        while not done.wait(RSS_EVERY_S if samples else 0):
            rss = rss_bytes(proc.pid)
            if rss is not None:
                samples.append((time.monotonic() - t0, rss))

    watcher = threading.Thread(target=watch_memory, daemon=True)
    watcher.start()
    versions = threading.Thread(target=new_versions, args=(bundle, proc, args.reload_every, done, made, rss_before),
                                daemon=True)
    if args.reload_every:
        versions.start()
    try:
        t0 = time.perf_counter()
        tally = asyncio.run(soak(args, address, request))
        elapsed = time.perf_counter() - t0
    finally:
        done.set()
        watcher.join(10)
        if versions.is_alive():
            versions.join(10)
        stop_server(proc)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    windows = summarise_latency(tally.latencies, args.seconds)
    warm = [rss for t, rss in samples if t >= min(WINDOW_S, args.seconds / 2)] or [rss for _, rss in samples]
    answered, sent = sum(tally.answered), sum(tally.sent)
    report = {
        "bench": "soak", "host": host_info(), "model": bundle.name, "resolution": manifest.resolution,
        "backend": args.backend, "streams": args.streams, "in_flight_per_stream": args.in_flight,
        "seconds": elapsed, "frames_sent": sent, "frames_answered": answered, "frames_lost": sent - answered,
        "errors": len(tally.errors), "error_examples": tally.errors[:5], "faces_per_s": answered / elapsed,
        "latency_windows": windows,
        "latency_drift": windows[-1]["p50_ms"] / windows[0]["p50_ms"] - 1 if len(windows) > 1 else None,
        "rss_mb": [(round(t, 1), round(rss / 2**20, 1)) for t, rss in samples],
        "rss_growth_after_warmup": warm[-1] / warm[0] - 1 if len(warm) > 1 else None,
        "goals": "0 errors, 0 lost frames, latency drift and RSS growth after warm-up < 5 %",
    }
    if args.reload_every:
        # The last version may have been made too late to answer before the end: it is not counted against the run.
        answered_by = [tally.versions.get(sha, 0) for sha in made]
        report.update(reload_every_s=args.reload_every, reloads=len(made) - 1,
                      versions_that_answered=sum(1 for n in answered_by if n),
                      frames_per_version=answered_by,
                      unknown_versions=sorted(set(tally.versions) - set(made)),
                      rss_before_reload_mb=[round(rss / 2**20, 1) for rss in rss_before])
        # From the first reload after warm-up to the last: what reloads leave behind.
        warm_reloads = [rss for i, rss in enumerate(rss_before) if (i + 1) * args.reload_every >= WINDOW_S]
        if len(warm_reloads) > 1:
            report["rss_growth_over_reloads"] = warm_reloads[-1] / warm_reloads[0] - 1
        report["goals"] += "; every version but perhaps the last answers; RSS between reloads grows < 5 % after warm-up"
    write_report(report, args.json_path)
    ok = report["errors"] == 0 and report["frames_lost"] == 0
    if args.reload_every:
        ok = ok and all(report["frames_per_version"][:-1]) and not report["unknown_versions"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
