#!/usr/bin/env python3
"""Live video through a real server: how much of a source playing at its own rate comes out swapped, and how late.

For each frame size (--sizes: franck.mp4's first --seconds scaled to the height and centred, one face, written as an
H.264 MPEG-TS clip at --fps), against one `facetwin-server serve` subprocess on loopback, --repeats rounds of:
  capacity  `swap_video_file` of the clip, encoded as live output is: every frame, as fast as the server answers
            over one stream (frames/s). The baseline: a live source faster than this cannot be swapped whole;
  live      `swap_live` of the same clip played at --fps (as `facetwin live --realtime` plays a file, as a camera
            delivers): frames written of those read, skipped for newer ones and dropped by the server, and the
            latency from a frame's read to its swapped frame's encoding (p50 / p99).
`written_share` should come near min(1, capacity / fps); the latency stays a few frames' server time whatever the
share. The client (decode, encode) and the server share this host's cores, as they would on one machine.

    python bench/live.py --model-dir out/models --json out/bench_live.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from full_frame import DEFAULT_SIZES, fit, parse_size  # bench/full_frame.py
from report import host_info, write_report  # bench/report.py
from serve import source_frames, start_server, stop_server  # bench/serve.py

from facetwin.client import Client, swap_live, swap_video_file
from facetwin.client.live import live_options
from facetwin.core.bundle import load_manifest, pick_bundle


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="out/models", help="folder of bundles (make demo writes out/models)")
    p.add_argument("--model", default=None, help="bundle name (default: the first one)")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="frame sizes, WxH[,WxH...]")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the clip played live")
    p.add_argument("--fps", type=int, default=30, help="the clip's frame rate: what the live source delivers")
    p.add_argument("--repeats", type=int, default=2, help="rounds of capacity and live per size")
    p.add_argument("--max-in-flight", type=int, default=2, help="swap_live's frames sent ahead of results")
    p.add_argument("--frames-file", default=None, help=".npz of source frames (`bench/gpu.sh --prepare`)")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--json", dest="json_path", default=None, help="also write the report here")
    args = p.parse_args()
    # What bench/serve.py's start_server reads.
    args.max_batch, args.max_delay_ms, args.inference_workers, args.detect_threads = 16, 2.0, 0, 2
    return args


def write_source(path: Path, frames: list[np.ndarray], fps: int) -> Path:
    with av.open(str(path), "w", format="mpegts") as output:
        stream = output.add_stream("libx264", rate=fps, options={"crf": "18", "preset": "veryfast"})
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))
    return path


def bench_size(client: Client, clip: Path, folder: Path, model: str, target: str, args) -> list[dict]:
    rounds = []
    for number in range(args.repeats):
        started = time.perf_counter()
        whole = swap_video_file(client, clip, folder / f"whole{number}.mp4", model, target, options=live_options())
        capacity = whole.frames / (time.perf_counter() - started)
        live = swap_live(client, str(clip), str(folder / f"live{number}.ts"), model, target, realtime=True,
                         max_in_flight=args.max_in_flight)
        rounds.append({
            "capacity_fps": round(capacity, 2),
            "frames_read": live.frames_read, "frames_written": live.frames_written, "skipped": live.skipped,
            "dropped": live.dropped, "written_share": round(live.frames_written / live.frames_read, 3),
            "expected_share": round(min(1.0, capacity / args.fps), 3),
            "latency_ms_p50": live.latency_ms_p50, "latency_ms_p99": live.latency_ms_p99,
            "live_seconds": round(live.seconds, 2),
        })
        print(f"  round {number + 1}: {rounds[-1]}", file=sys.stderr)
    return rounds


def main() -> None:
    args = parse_args()
    bundle = pick_bundle(Path(args.model_dir), args.model)
    manifest = load_manifest(bundle)
    model, target = bundle.name, manifest.identities[-1]
    frames = source_frames(round(args.seconds * 24), args.frames_file, consecutive=True)
    proc, address = start_server(args, bundle.parent)
    sizes = {}
    try:
        with Client(address) as client, tempfile.TemporaryDirectory() as temp:
            for text in args.sizes.split(","):
                size = parse_size(text)
                print(f"{text}:", file=sys.stderr)
                # franck.mp4 plays at 24 fps; the clip shows its frames at --fps (a faster or slower source).
                clip = write_source(Path(temp) / f"{text}.ts", [fit(f, size) for f in frames], args.fps)
                rounds = bench_size(client, clip, Path(temp), model, target, args)
                sizes[text] = {
                    "rounds": rounds,
                    "median": {key: statistics.median(r[key] for r in rounds if r[key] is not None)
                               for key in ("capacity_fps", "written_share", "expected_share", "latency_ms_p50",
                                           "latency_ms_p99")},
                }
    finally:
        stop_server(proc)
    write_report({
        "bench": "live", "date": time.strftime("%Y-%m-%d"), "host": host_info(), "model": model, "target": target,
        "backend": args.backend, "fps": args.fps, "seconds": args.seconds, "frames": len(frames),
        "max_in_flight": args.max_in_flight, "sizes": sizes,
        "command": " ".join(sys.argv),
    }, args.json_path)


if __name__ == "__main__":
    main()
