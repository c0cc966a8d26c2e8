"""Client load for bench/serve.py: unary calls or streams from N client processes, so the client is not the ceiling.

One asyncio client process tops out near the server's rate (one stream from one process reached ~7,700 msgs/s
on a 16-core GPU host), so throughput phases spread their calls over `clients` processes. Requests travel
pre-serialized (bytes in, no per-call protobuf encoding on the client); replies are parsed for their stage
timings and frame status. The processes are spawned (gRPC does not survive fork), connect and warm up, then
start together on a barrier; each measures its own window and the rates add up. Each stream has a connection of its
own, as separate callers would: a server of several processes (--processes) hands out connections, not calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

SWAP = "/facetwin.v1.FaceSwap/Swap"
SWAP_STREAM = "/facetwin.v1.FaceSwap/SwapStream"
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
# Channels of one process with the same target and options share one connection unless each keeps its own pool.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
START_TIMEOUT_S = 120.0  # spawn + imports + connect + one warm-up call, per client process
# The CA of a bench server that speaks TLS (serve.py --tls): set in the environment, so the client processes see it.
BENCH_CA_ENV = "FACETWIN_BENCH_CA"


def open_channel(address: str, options: list | None = None, aio: bool = True) -> Any:
    """A channel to a bench server: TLS trusting BENCH_CA_ENV's CA when it is set, else plaintext."""
    import grpc

    ca = os.environ.get(BENCH_CA_ENV)
    kind = grpc.aio if aio else grpc
    if not ca:
        return kind.insecure_channel(address, options=options)
    return kind.secure_channel(address, grpc.ssl_channel_credentials(Path(ca).read_bytes()), options=options)


def split(total: int, parts: int) -> list[int]:
    """`total` spread over `parts` as evenly as possible, dropping empty parts: split(10, 4) -> [3, 3, 2, 2]."""
    return [n for n in (total // parts + (i < total % parts) for i in range(parts)) if n > 0]


async def _client(address: str, payloads: list[bytes], kind: str, count: int, seconds: float, barrier: Any,
                  offset: int) -> dict[str, Any]:
    """`count` unary workers on one channel, or `count` streams on a channel each; returns completions, rate and stage
    timings."""
    import grpc

    from facetwin.v1 import facetwin_pb2 as pb

    async with contextlib.AsyncExitStack() as channels:
        async def connect() -> grpc.aio.Channel:
            return await channels.enter_async_context(open_channel(address, CHANNEL_OPTIONS + OWN_CONNECTION))

        channel = await connect()
        swap = channel.unary_unary(SWAP, request_serializer=None, response_deserializer=pb.SwapResponse.FromString)
        streams = [(await connect() if k else channel).stream_stream(
            SWAP_STREAM, request_serializer=None, response_deserializer=pb.SwapStreamResponse.FromString)
            for k in range(count if kind == "stream" else 0)]
        unary_payloads = [pb.SwapStreamRequest.FromString(p).request.SerializeToString() for p in payloads] \
            if kind == "unary" else []
        warm = unary_payloads[0] if unary_payloads else pb.SwapStreamRequest.FromString(payloads[0]).request.SerializeToString()
        await swap(warm)
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait, START_TIMEOUT_S)
        latencies: list[float] = []
        timings: list[Any] = []
        dropped = 0
        start, cpu_start = time.perf_counter(), time.process_time()
        stop_at = start + seconds

        async def unary_worker(k: int) -> int:
            done, i = 0, offset + k
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                reply = await swap(unary_payloads[i % len(unary_payloads)])
                latencies.append(time.perf_counter() - t0)
                timings.append(reply.timings)
                done += 1
                i += count
            return done

        async def stream_worker(k: int) -> int:
            nonlocal dropped

            async def frames():
                i = offset + k
                while time.perf_counter() < stop_at:
                    yield payloads[i % len(payloads)]
                    i += 1

            done = 0
            async for reply in streams[k](frames()):
                if reply.status == pb.FRAME_STATUS_DROPPED:
                    dropped += 1
                else:
                    timings.append(reply.response.timings)
                done += 1
            return done

        worker = unary_worker if kind == "unary" else stream_worker
        done = sum(await asyncio.gather(*(worker(k) for k in range(count))))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    stages = ("decode_ms", "detect_ms", "track_ms", "embed_ms", "align_ms", "queue_ms", "inference_ms", "blend_ms",
              "encode_ms", "total_ms")
    return {"done": done, "elapsed_s": elapsed, "cpu_s": cpu, "dropped": dropped, "latencies_ms": [t * 1e3 for t in latencies],
            "batch_sizes": [t.batch_size for t in timings],
            "stage_sums_ms": {name: float(sum(getattr(t, name) for t in timings)) for name in stages},
            "timed": len(timings)}


def _client_main(address: str, payloads: list[bytes], kind: str, count: int, seconds: float, barrier: Any,
                 offset: int, results: Any) -> None:
    try:
        results.put(asyncio.run(_client(address, payloads, kind, count, seconds, barrier, offset)))
    except BaseException as exc:  # reported to the parent, which fails the phase with it
        barrier.abort()
        results.put({"error": f"{type(exc).__name__}: {exc}"})


def run_load(address: str, payloads: list[bytes], kind: str, total: int, clients: int, seconds: float) -> dict[str, Any]:
    """`total` unary calls in flight (kind "unary") or `total` streams (kind "stream") spread over `clients`
    processes for `seconds`. `payloads` are serialized SwapStreamRequests (unary calls send their `request`).
    Returns the aggregate rate, latency percentiles (unary), mean batch size and mean stage timings."""
    import numpy as np

    if kind not in ("unary", "stream"):
        raise ValueError(f"kind must be unary or stream, got {kind!r}")
    shares = split(total, max(1, clients))
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(shares) + 1)
    results = ctx.Queue()
    procs, offset = [], 0
    for share in shares:
        procs.append(ctx.Process(target=_client_main, daemon=True,
                                 args=(address, payloads, kind, share, seconds, barrier, offset, results)))
        offset += share
    for proc in procs:
        proc.start()
    try:
        barrier.wait(START_TIMEOUT_S)
    except Exception:
        pass  # a client failed before the start: its error arrives on the queue
    outcomes = [results.get(timeout=START_TIMEOUT_S + seconds + 60) for _ in procs]
    for proc in procs:
        proc.join(30)
    errors = [o["error"] for o in outcomes if "error" in o]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(procs)} client process(es) failed: {errors[0]}")
    done = sum(o["done"] for o in outcomes)
    timed = sum(o["timed"] for o in outcomes)
    report: dict[str, Any] = {
        "per_s": float(sum(o["done"] / o["elapsed_s"] for o in outcomes)),
        "completed": done, "dropped": sum(o["dropped"] for o in outcomes),
        "clients": len(procs), ("in_flight" if kind == "unary" else "streams"): total,
        # CPU cores the client processes kept busy: on a small host they compete with the server for the same cores.
        "client_cpu_cores": float(sum(o["cpu_s"] / o["elapsed_s"] for o in outcomes)),
        "mean_batch": float(np.mean([b for o in outcomes for b in o["batch_sizes"]])) if timed else None,
        "mean_stage_ms": {name: (sum(o["stage_sums_ms"][name] for o in outcomes) / timed if timed else None)
                          for name in outcomes[0]["stage_sums_ms"]},
    }
    latencies = [x for o in outcomes for x in o["latencies_ms"]]
    if latencies:
        report["p50_ms"] = float(np.percentile(latencies, 50))
        report["p99_ms"] = float(np.percentile(latencies, 99))
    return report
