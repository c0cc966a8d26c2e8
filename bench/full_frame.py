"""`bench/serve.py --full-frame`: whole frames through a real server, against the same stages run raw in this process.

For each frame size (--sizes, default 1920x1080 and 640x480: franck.mp4's frames scaled to the height and centred, one
face), --repeats rounds of, alternately:
  raw      every stage of a full frame alone, in this process, one thread each as the server runs them: the detector
           (MediaPipe's at the server's 640 px), one FaceMesh follow pass, the aligned crop, the model at batch 1,
           the swapped crop's landmarks (shape_fit), the shape bend + colour match (finish), the paste, a raw frame's
           copies in and out; wall ms (median) and the process's CPU ms (mean) of each. A stream's frame costs
           (detect + shape_fit) / N + follow * (N - 1) / N + the rest (N = --detect-every); `frames_per_s` is what
           all the host's cores would do running nothing but these stages, from their CPU ms;
  unary    Swap calls (detection on every frame), --concurrency in flight;
  stream   one SwapStream (faces detected every N frames and followed between), as fast as its window allows;
  streams  --streams streams at once.
Each served phase reports frames/s, the server's mean per-stage timings, the CPU cores the server and the client kept
busy, and the server's CPU milliseconds per frame, which contention from other processes inflates far less than
wall time. The load average is recorded around every phase: on a shared host, compare rounds, not runs.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from load import CHANNEL_OPTIONS, open_channel, run_load  # bench/load.py: client processes
from report import host_info, write_report  # bench/report.py

from facetwin.core.bundle import load_manifest
from facetwin.server.backends import get_backend
from facetwin.server.config import ServerConfig
from facetwin.v1 import facetwin_pb2 as pb
from facetwin.v1 import facetwin_pb2_grpc as pb_grpc

DEFAULT_SIZES = "1920x1080,640x480"


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a frame size is WIDTHxHEIGHT, e.g. 1920x1080; got {text!r}") from None
    if not (64 <= width <= 4096 and 64 <= height <= 4096):
        raise argparse.ArgumentTypeError(f"frame sides must be in 64..4096, got {text!r}")
    return width, height


def fit(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A frame scaled to the size's height and centred on a black canvas of that size (cropped if wider)."""
    width, height = size
    scaled = cv2.resize(frame, (round(frame.shape[1] * height / frame.shape[0]), height),
                        interpolation=cv2.INTER_CUBIC if height > frame.shape[0] else cv2.INTER_AREA)
    canvas = np.zeros((height, width, 3), np.uint8)
    take = min(width, scaled.shape[1])
    left, skip = (width - take) // 2, (scaled.shape[1] - take) // 2
    canvas[:, left:left + take] = scaled[:, skip:skip + take]
    return canvas


# How frames travel: raw pixels both ways; raw pixels answered with the changed region only (return_region, as the SDK
# sends raw frames); JPEG (quality 90) both ways.
FRAME_ENCODINGS = ("raw", "raw-region", "jpeg")


def full_frame_request(model: str, target: str, frame: np.ndarray, frame_id: int, encoding: str) -> pb.SwapRequest:
    h, w, _ = frame.shape
    if encoding == "jpeg":
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        return pb.SwapRequest(model=model, target=target, frame_id=frame_id, kind=pb.IMAGE_KIND_FULL_FRAME,
                              image=pb.Image(encoded=data.tobytes()), output_encoding=pb.ENCODING_JPEG,
                              jpeg_quality=90)
    return pb.SwapRequest(model=model, target=target, frame_id=frame_id, kind=pb.IMAGE_KIND_FULL_FRAME,
                          image=pb.Image(raw=pb.RawImage(pixels=frame.tobytes(), height=h, width=w, channels=3,
                                                         color_order=pb.COLOR_ORDER_RGB)),
                          return_region=encoding == "raw-region")


def raw_stages(bundle: Path, backend_name: str, target: str, frames: list[np.ndarray], detect_every: int,
               keep_shape: float, detect_runtime: str = "onnxruntime", repeats: int = 2) -> dict:
    """Median ms of each full-frame stage run alone in this process (see the module docstring)."""
    from facetwin.core import alignment, blending
    from facetwin.core.faces import FaceDetector
    from facetwin.server import imaging
    from facetwin.server.detectors import single_threaded_blas
    from facetwin.server.fullframe import ALIGN_MARGIN, BLEND_FEATHER

    single_threaded_blas()  # as the server runs
    config = ServerConfig()
    # The server's face-model runtime: on a GPU host the raw stages detect on the GPU as the served ones do.
    detector = FaceDetector(config.detector, max_side=config.detect_max_side, landmarks=config.landmarks, threads=1,
                            runtime=detect_runtime)
    manifest = load_manifest(bundle)
    backend = get_backend(backend_name)(bundle, manifest, target, max_batch=1, intra_op_threads=1)
    size = manifest.resolution
    spent: dict[str, list[float]] = collections.defaultdict(list)
    cpu: dict[str, list[float]] = collections.defaultdict(list)

    def timed(stage, fn, *args):
        start, start_cpu = time.perf_counter(), time.process_time()  # the process's CPU: OpenCV's threads count too
        out = fn(*args)
        spent[stage].append((time.perf_counter() - start) * 1e3)
        cpu[stage].append((time.process_time() - start_cpu) * 1e3)
        return out

    previous = None
    for frame in [f for _ in range(repeats) for f in frames]:
        data = timed("copy_in", frame.tobytes)  # the request's pixels out of its message
        image = np.frombuffer(data, np.uint8).reshape(frame.shape)
        faces = timed("detect", detector.detect, image)
        if not faces:
            continue
        face = faces[0]
        if detector.can_follow:
            face = timed("follow", detector.follow, image, [previous or face])[0][0]
        previous = faces[0]
        crop, matrix = timed("align", alignment.align, image, face, size, ALIGN_MARGIN)
        points = alignment.transform_points(face.landmarks, matrix) if face.landmarks is not None else None
        hull = blending.face_mask(size, points, ALIGN_MARGIN)
        swapped = imaging.to_hwc_uint8(timed("inference", backend.infer, imaging.to_nchw_float([crop]))[0])[0]
        fitted = timed("shape_fit", detector.crop_landmarks, swapped, ALIGN_MARGIN)  # a stream: every N-th frame
        finished = timed("finish", blending.finish_face, crop, swapped, hull, points, ALIGN_MARGIN, keep_shape,
                         lambda crop, margin: fitted)
        out = timed("frame_copy", np.array, image)
        timed("paste", blending.paste_into, out, finished, hull, matrix, BLEND_FEATHER)
        timed("copy_out", out.tobytes)  # the answer's pixels into its message
    backend.close()
    ms = {stage: float(np.median(times)) for stage, times in spent.items()}
    cpu_ms = {stage: float(np.mean(times)) for stage, times in cpu.items()}
    cpus = os.cpu_count() or 1
    out = {"ms": ms, "cpu_ms": cpu_ms, "cpus": cpus}
    for name, table in (("", ms), ("cpu_", cpu_ms)):
        stream, unary = frame_cost(table, detect_every if detector.can_follow else 1)
        out[f"{name}stream_frame_ms"], out[f"{name}unary_frame_ms"] = stream, unary
    out["frames_per_s"] = cpus * 1e3 / out["cpu_stream_frame_ms"]  # every core busy with these stages and nothing else
    return out


def frame_cost(ms: dict[str, float], detect_every: int) -> tuple[float, float]:
    """ms of one stream frame (detection and the shape fit on every detect_every-th frame, following between) and of
    one unary frame (detection, shape fit), from the stages' ms."""
    every = {"detect", "shape_fit"}
    rest = sum(v for k, v in ms.items() if k not in every | {"follow"})
    stream = sum(ms.get(k, 0.0) for k in every) / detect_every + ms.get("follow", 0.0) * (1 - 1 / detect_every) + rest
    return stream, sum(ms.get(k, 0.0) for k in every) + rest


def served(proc, phase) -> dict:
    """A served phase with the server's CPU cores and CPU ms per frame, and the load average around it."""
    from serve import with_server_cpu

    before = os.getloadavg()[0]
    result = with_server_cpu(proc, phase)
    result["load_average"] = [round(before, 2), round(os.getloadavg()[0], 2)]
    if result.get("server_cpu_cores") is not None and result["per_s"]:
        result["server_cpu_ms_per_frame"] = result["server_cpu_cores"] / result["per_s"] * 1e3
    return result


def bench_size(args: argparse.Namespace, proc, address: str, bundle: Path, model: str, target: str,
               sources: np.ndarray, size: tuple[int, int], on_round: Callable[[dict], None] | None = None) -> dict:
    """One frame size's rounds; on_round(the result over the rounds so far) after each, so that a run stopped
    between rounds keeps the rounds it finished."""
    from serve import stream_payloads

    frames = [fit(frame, size) for frame in sources]
    requests = {encoding: [full_frame_request(model, target, frame, i, encoding) for i, frame in enumerate(frames)]
                for encoding in args.frame_encodings}
    payloads = {encoding: stream_payloads(sent) for encoding, sent in requests.items()}
    first = args.frame_encodings[0]
    with open_channel(address, CHANNEL_OPTIONS, aio=False) as warm_channel:
        stub = pb_grpc.FaceSwapStub(warm_channel)
        answers = {encoding: stub.Swap(sent[0], timeout=120) for encoding, sent in requests.items()}
    warm = answers[first]
    if not warm.faces:
        sys.exit(f"error: the server found no face in the {size[0]}x{size[1]} benchmark frame")
    detect_every = args.detect_every or ServerConfig().detect_every  # the raw stages model this server's setting
    keep_shape = args.keep_shape if args.keep_shape is not None else ServerConfig().keep_shape
    face = warm.faces[0]
    sent_bytes = [len(r.image.encoded) or len(r.image.raw.pixels) for r in requests[first]]
    fixed = {"frame": list(size), "face_width": face.box.x1 - face.box.x0, "distinct_frames": len(frames),
             "request_bytes_mean": float(np.mean(sent_bytes)), "landmarks": len(face.landmarks),
             # The first frame's answer (the whole SwapResponse message) as each encoding sends it back.
             "answer_bytes": {encoding: answer.ByteSize() for encoding, answer in answers.items()}}
    rounds = []
    for _ in range(args.repeats):
        stages = raw_stages(bundle, args.backend, target, frames, detect_every, keep_shape, args.detect_runtime)
        served_by = {}  # encoding -> its phases; alternated within the round, so drift hits every encoding alike
        for encoding, sent in payloads.items():
            served_by[encoding] = {
                "unary": served(proc, lambda: run_load(address, sent, "unary", min(args.concurrency, 4 * args.streams),
                                                       args.clients, args.seconds)),
                "stream": served(proc, lambda: run_load(address, sent, "stream", 1, 1, args.seconds)),
                "streams": served(proc, lambda: run_load(address, sent, "stream", args.streams, args.clients,
                                                         args.seconds))}
        rounds.append({"raw_stages": stages, "served": served_by,
                       "stream_over_raw": served_by[first]["stream"]["per_s"] / stages["frames_per_s"]})
        result = {**fixed, **rounds_result(first, rounds)}
        if on_round is not None:
            on_round(result)
    return result


def rounds_result(first: str, rounds: list[dict]) -> dict:
    """A size's measured part from its rounds: the round of the median one-stream rate, and every round's rates."""
    middle = sorted(rounds, key=lambda r: r["served"][first]["stream"]["per_s"])[(len(rounds) - 1) // 2]
    # The first encoding's phases at the top level; every encoding's (same round) under by_encoding.
    return {"raw": middle["raw_stages"], **middle["served"][first], "stream_over_raw": middle["stream_over_raw"],
            "by_encoding": middle["served"],
            "rounds": [{"raw_frames_per_s": r["raw_stages"]["frames_per_s"],
                        "load_average": r["served"][first]["stream"]["load_average"],
                        **{(name if encoding == first else f"{name}_{encoding}"): phases[name]["per_s"]
                           for encoding, phases in r["served"].items() for name in ("unary", "stream", "streams")}}
                       for r in rounds]}


def report(args: argparse.Namespace, model: str, target: str, res: int, sizes: dict[str, dict]) -> dict:
    """The JSON of the sizes measured so far."""
    config = ServerConfig()
    first = next(iter(sizes.values()))
    return {
        "bench": "serve-full-frame",
        "host": host_info(),
        "bundle": {"name": model, "resolution": res, "target": target, "backend": args.backend},
        "server": {"python": args.server_python or sys.executable, "max_batch": args.max_batch,
                   "processes": args.processes, "tls": args.tls,
                   "max_delay_ms": args.max_delay_ms,
                   "detect_threads": args.detect_threads, "detect_runtime": args.detect_runtime,
                   "detector": config.detector,
                   "detect_every": args.detect_every or config.detect_every,
                   "keep_shape": args.keep_shape if args.keep_shape is not None else config.keep_shape},
        "frame_encoding": args.frame_encodings[0], "frame_encodings": list(args.frame_encodings),
        "repeats": args.repeats,
        # The first size's phases at the top level, where bench/gpu_bench.py reads them.
        "frame": first["frame"], "unary": first["unary"], "stream": first["stream"], "streams": first["streams"],
        "by_encoding": first["by_encoding"], "sizes": sizes,
    }


def main(args: argparse.Namespace, bundle: Path, model: str, target: str, res: int) -> None:
    from serve import source_frames, start_server, stop_server

    sources = source_frames(args.frames, args.frames_file, consecutive=True)
    proc, address = start_server(args, bundle.parent)
    sizes: dict[str, dict] = {}
    try:
        for w, h in args.sizes:  # written after each round: a run stopped later keeps the rounds already measured
            def keep(result: dict, name: str = f"{w}x{h}") -> None:
                sizes[name] = result
                write_report(report(args, model, target, res, sizes), args.json_path, echo=False)

            bench_size(args, proc, address, bundle, model, target, sources, (w, h), on_round=keep)
    finally:
        stop_server(proc)
    write_report(report(args, model, target, res, sizes), args.json_path)
    for name, result in sizes.items():
        print(f"{name}: one stream {result['stream']['per_s']:.1f} frames/s "
              f"({result['stream'].get('server_cpu_ms_per_frame', 0):.0f} ms of server CPU per frame; raw stages "
              f"{result['raw']['cpu_stream_frame_ms']:.0f} ms of CPU, {result['raw']['frames_per_s']:.1f} frames/s on "
              f"{result['raw']['cpus']} cores), {args.streams} streams {result['streams']['per_s']:.1f}, "
              f"unary {result['unary']['per_s']:.1f}", file=sys.stderr)
        for encoding, phases in list(result["by_encoding"].items())[1:]:
            print(f"  {encoding}: one stream {phases['stream']['per_s']:.1f}, {args.streams} streams "
                  f"{phases['streams']['per_s']:.1f}, unary {phases['unary']['per_s']:.1f} frames/s; "
                  f"{result['answer_bytes'][encoding] / 1e3:.0f} KB per answer (first encoding: "
                  f"{result['answer_bytes'][args.frame_encodings[0]] / 1e3:.0f} KB)", file=sys.stderr)
