#!/usr/bin/env bash
# imgpipe GPU check: one call, about 6-7 minutes, from the repository root.
#
#   bash tools/gpu_check/gpu_check.sh       # or: make gpu-check OUT=dir
#
# Works offline: .venv when it imports torch and the project, else the system python3
# with the wheels in .whl/ unpacked into $GPU_CHECK_SITE. Steps, each with its own
# timeout, carrying on after failures, most important first:
#   1. nvidia-smi (required), GPU/driver facts; Python and the wheels; env probe
#   2. pytest tests/gpu
#   3. imgpipe score on the labelled photographs (Pillow, cuda, torch fp32/fp16/bf16):
#      top-1/top-5 accuracy and top-1 agreement with fp32
#   4. imgpipe score on generated mixed-size JPEGs with --device cuda (images/s)
#   5. model-only probe: TorchBackend fp32/fp16/bf16 x batch 32/256, synchronised and
#      CUDA-event timed; cudnn autotune stalls; eager vs CUDA graph headroom
#   6. DALI probe and score --backend dali, also with its batches through the host, with
#      windowed decoding, and from the tensor cache ("DALI missing" where it is not installed)
#   7. if time is left: the same score on cpu, doctor, transport probe, torch.compile, bench
# Results: $OUT/summary.txt, $OUT/report.json, $OUT/logs.tar.gz.
#
# Knobs: OUT (default ${TMPDIR:-/tmp}/imgpipe_gpu_check), GPU_CHECK_BUDGET_S (420),
# GPU_CHECK_PHOTOS (labelled photos with labels.csv; default .photos, else
# ../shared/data/imagenet-val-100), GPU_CHECK_IMAGES (400 generated JPEGs),
# GPU_CHECK_DATA (where they are generated, reused between runs), GPU_CHECK_SITE
# (/tmp/site), GPU_CHECK_PYTHON (a python3 with torch, tried first), GPU_CHECK_VENV=0
# (ignore .venv).

set -uo pipefail
umask 022

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROBE="$SCRIPT_DIR/gpu_probe.py"
REPO="$(pwd)"
START=$(date +%s)
BUDGET_S="${GPU_CHECK_BUDGET_S:-420}"
DEADLINE=$((START + BUDGET_S))
RESERVE_S=12                                  # kept for the summary and the tarball
N_IMAGES="${GPU_CHECK_IMAGES:-400}"
DATA_ROOT="${GPU_CHECK_DATA:-${TMPDIR:-/tmp}/gpu_check_data}"
SITE="${GPU_CHECK_SITE:-/tmp/site}"
OUT="${OUT:-${TMPDIR:-/tmp}/imgpipe_gpu_check}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
LOG="$WORK/logs"
STEPS="$WORK/steps.tsv"
mkdir -p "$OUT" "$LOG" "$WORK/cache"
: > "$STEPS"

if [[ ! -f $REPO/pipeline/__init__.py ]]; then
    echo "run this from the imgpipe repository root" >&2
    exit 2
fi

# set -x into its own file, so that stdout stays a readable progress report.
exec {XFD}>"$LOG/xtrace.log"
BASH_XTRACEFD=$XFD
set -x

export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# Never the user's caches: the result cache would turn a score run into a lookup.
export IMGPIPE_CACHE__DIR="$WORK/cache" XDG_CACHE_HOME="$WORK/xdg"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY=""
PY_ENV="none"
DMON_PID=""

say() { printf '%s [%4ss] %s\n' "$(date +%H:%M:%S)" "$(( $(date +%s) - START ))" "$*"; }
left() { echo $(( DEADLINE - $(date +%s) - RESERVE_S )); }
note() { printf '%s\t%s\t0\t%s\n' "$1" "$2" "$3" >> "$STEPS"; say "$1: $2 ($3)"; }

# run_step NAME MAX_S MIN_S CMD...: timeout min(MAX_S, budget left), skipped when less
# than MIN_S is left. Output in $LOG/NAME.log. Never aborts the script.
run_step() {
    local name=$1 max=$2 min=$3; shift 3
    local avail t rc start dur status
    avail=$(left)
    t=$max; (( avail < t )) && t=$avail
    if (( t < min )); then
        note "$name" skipped "budget: ${avail}s left, needs ${min}s"
        return 99
    fi
    say "$name (timeout ${t}s)"
    start=$(date +%s)
    timeout -k 5 "$t" "$@" > "$LOG/$name.log" 2>&1
    rc=$?
    dur=$(( $(date +%s) - start ))
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    printf '%s\t%s\t%s\trc=%s\n' "$name" "$status" "$dur" "$rc" >> "$STEPS"
    say "  -> $status (rc=$rc, ${dur}s)"
    if [[ $status != ok ]]; then tail -n 8 "$LOG/$name.log" | sed 's/^/     | /'; fi
    return $rc
}

# A probe's own budget: its step's timeout less a margin to write its JSON.
probe_budget() { local a; a=$(left); (( a > $1 )) && a=$1; echo $(( a > 10 ? a - 5 : 5 )); }

# nvidia-smi dmon while a step runs: its sm column shows how busy the GPU was.
start_dmon() { nvidia-smi dmon -s u -d 1 -o T > "$LOG/dmon_$1.log" 2>&1 & DMON_PID=$!; }
stop_dmon() {
    if [[ -n $DMON_PID ]]; then kill "$DMON_PID" 2>/dev/null; wait "$DMON_PID" 2>/dev/null; fi
    DMON_PID=""
}

write_meta() {
    local gpu driver
    gpu=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)
    driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
    cat > "$WORK/meta.json" <<EOF
{"date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)", "gpu": "$gpu", "driver": "$driver",
 "python_env": "$PY_ENV", "python": "${PY:-python3}", "budget_s": $BUDGET_S,
 "elapsed_s": $(( $(date +%s) - START )), "images": $N_IMAGES, "repo": "$REPO"}
EOF
}

finish() {
    local rc=$?
    set +x
    stop_dmon
    write_meta
    python3 "$PROBE" summarize --work "$WORK" --out-dir "$OUT" > "$LOG/summarize.log" 2>&1 ||
        { echo "summary failed; steps:"; cat "$STEPS"; } > "$OUT/summary.txt"
    cp "$WORK/meta.json" "$STEPS" "$LOG/" 2>/dev/null
    tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs 2>/dev/null
    rm -rf "$WORK/cache" "$WORK/xdg" "$WORK/samples_x" "$WORK/tensor_cache"
    echo
    cat "$OUT/summary.txt" 2>/dev/null
    echo
    say "done (exit $rc): $OUT/summary.txt, $OUT/report.json, $OUT/logs.tar.gz"
    exit "$rc"
}
trap finish EXIT

# ----------------------------------------------------------------- 1. GPU, Python
check_gpu() {
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi > "$LOG/nvidia-smi.log" 2>&1; then
        note nvidia-smi failed "no working nvidia-smi: not a GPU machine"
        exit 2
    fi
    note nvidia-smi ok "$(nvidia-smi --query-gpu=name,driver_version,memory.total \
        --format=csv,noheader | head -1)"
    timeout 20 nvidia-smi topo -m > "$LOG/nvidia-smi-topo.log" 2>&1
    timeout 20 nvidia-smi -q -d CLOCK,PERFORMANCE > "$LOG/nvidia-smi-q.log" 2>&1
    { nproc; lscpu 2>/dev/null | head -20; free -g 2>/dev/null; } > "$LOG/host.log" 2>&1
}

imports_ok() { timeout 90 "$1" -c 'import torch, pydantic, pipeline.config, workers.cli' \
    >> "$LOG/imports.log" 2>&1; }

# .venv when it works; else a python3 with torch, plus the wheels of .whl/ in $SITE.
choose_python() {
    if [[ ${GPU_CHECK_VENV:-1} == 1 && -x .venv/bin/python ]] && imports_ok .venv/bin/python; then
        PY="$REPO/.venv/bin/python"; PY_ENV="venv"; return
    fi
    local candidate
    for candidate in ${GPU_CHECK_PYTHON:-} python3; do
        if timeout 60 "$candidate" -c 'import torch' >/dev/null 2>&1; then PY=$candidate; break; fi
    done
    PY="${PY:-${GPU_CHECK_PYTHON:-python3}}"; PY_ENV="system python, PYTHONPATH=repo"
    if compgen -G ".whl/*.whl" > /dev/null; then
        # --upgrade: a second run on the same machine replaces what the first unpacked.
        run_step wheels 90 10 "$PY" -m pip install -q --no-index --no-deps --no-compile \
            --upgrade --target "$SITE" .whl/*.whl
        export PYTHONPATH="$SITE:$PYTHONPATH"
        PY_ENV="$PY_ENV + .whl/ in $SITE"
    else
        note wheels skipped "no .whl/ in the working tree"
    fi
    if imports_ok "$PY"; then note imports ok "torch, pydantic, pipeline, workers.cli"
    else note imports failed "see logs/imports.log"; fi
}

say "imgpipe GPU check in $REPO; budget ${BUDGET_S}s; output $OUT"
check_gpu
choose_python
say "python: $PY ($PY_ENV)"
IMGPIPE=("$PY" -m imgpipe)
run_step probe_env 60 10 "$PY" "$PROBE" env --out "$LOG/env.json"

# ----------------------------------------------------------------- 2. GPU tests
run_step pytest_gpu 120 30 "$PY" -m pytest tests/gpu -q -p no:cacheprovider --timeout 100 \
    --junitxml="$LOG/pytest_gpu.xml"

# ----------------------------------------------------------------- 3. photographs
# score NAME CAP ARGS...: one `imgpipe score ARGS` run (no cache) into score_NAME.jsonl.
score() {
    local name=$1 cap=$2; shift 2
    start_dmon "$name"
    run_step "score_$name" "$cap" 20 "${IMGPIPE[@]}" score "$@" --no-cache \
        --out "$LOG/score_$name.jsonl"
    local rc=$?
    stop_dmon
    return $rc
}

find_photos() {
    local dir
    for dir in "${GPU_CHECK_PHOTOS:-}" .photos ../shared/data/imagenet-val-100; do
        if [[ -n $dir && -f $dir/labels.csv ]]; then echo "$dir"; return; fi
    done
}

PHOTOS="$(find_photos)"
if [[ -n $PHOTOS ]] && run_step photos_list 20 5 "$PY" "$PROBE" photos-list \
        --photos "$PHOTOS" --out "$WORK/photos.txt"; then
    PHOTO_RUNS=()
    for precision in ${GPU_CHECK_PRECISIONS:-fp32 fp16 bf16}; do
        score "photos_$precision" 60 --files-from "$WORK/photos.txt" --device cuda \
            --backend pillow --model-backend torch --precision "$precision" --topk 5
        PHOTO_RUNS+=(--run "$precision=$LOG/score_photos_$precision.jsonl")
    done
    if [[ -s $LOG/score_photos_fp32.jsonl ]]; then
        run_step compare_photos 30 5 "$PY" "$PROBE" compare --labels "$PHOTOS/labels.csv" \
            "${PHOTO_RUNS[@]}" --out "$LOG/compare_photos.json"
    fi
else
    note photos skipped "no labelled photographs (GPU_CHECK_PHOTOS, .photos, ../shared/data)"
fi

# ----------------------------------------------------------------- 4. generated JPEGs
cat > "$WORK/make_data.py" <<'EOF'
import sys
from pathlib import Path

from benchmarks.datasets import describe, ensure_dataset, ensure_subset

if __name__ == "__main__":  # ensure_dataset uses a spawn pool: the guard is required
    count, root = int(sys.argv[1]), Path(sys.argv[2])
    directory = ensure_dataset(count, 0, root)
    subset = ensure_subset(directory, 64)
    Path(sys.argv[3]).write_text(f"{directory}\n{subset}\n")
    print(directory, subset, describe(directory), sep="\n")
EOF
DATA_DIR=""; SUBSET_DIR=""
if run_step dataset 90 15 "$PY" "$WORK/make_data.py" "$N_IMAGES" "$DATA_ROOT" \
        "$WORK/dataset_paths.txt"; then
    DATA_DIR="$(sed -n 1p "$WORK/dataset_paths.txt")"; SUBSET_DIR="$(sed -n 2p "$WORK/dataset_paths.txt")"
fi
if [[ ! -d $DATA_DIR ]]; then   # fallback: the samples, copied many times (no size variety)
    DATA_DIR="$WORK/samples_x"; mkdir -p "$DATA_DIR"
    for i in $(seq 1 60); do for f in samples/*.jpg; do cp "$f" "$DATA_DIR/$(basename "$f" .jpg)_$i.jpg"; done; done
    SUBSET_DIR="$DATA_DIR"
    say "dataset generation failed: using copies of samples/ ($DATA_DIR)"
fi
score synthetic_cuda 75 "$DATA_DIR" --device cuda --backend pillow

# ----------------------------------------------------------------- 5. model-only probe
run_step probe_startup 60 20 "$PY" "$PROBE" startup --budget 55 --out "$LOG/startup.json"
run_step probe_model 100 30 "$PY" "$PROBE" model --seconds 1.5 --budget "$(probe_budget 100)" \
    --out "$LOG/model.json"

# ----------------------------------------------------------------- 6. DALI
start_dmon probe_dali
run_step probe_dali 60 5 "$PY" "$PROBE" dali --images "$DATA_DIR" --limit 256 --seconds 2 \
    --budget "$(probe_budget 60)" --out "$LOG/dali.json"
stop_dmon
if timeout 60 "$PY" -c 'import nvidia.dali' >/dev/null 2>&1; then
    score synthetic_cuda_dali 75 "$DATA_DIR" --device cuda --backend dali
    # The same run with DALI's batches copied to the host and back (dali_output).
    IMGPIPE_PREPROCESS__DALI_OUTPUT=host \
        score synthetic_cuda_dali_host 75 "$DATA_DIR" --device cuda --backend dali
    # And with nvJPEG decoding each JPEG's crop window only (dali_roi_decode).
    IMGPIPE_PREPROCESS__DALI_ROI_DECODE=on \
        score synthetic_cuda_dali_roi 75 "$DATA_DIR" --device cuda --backend dali
    # Is the tensor cache worth reading on the GPU path? Results off: a run that
    # stores every tensor, then one that reads them back instead of decoding.
    for pass in fill read; do
        IMGPIPE_CACHE__RESULTS=false run_step "score_synthetic_cuda_dali_tensors_$pass" 75 20 \
            "${IMGPIPE[@]}" score "$DATA_DIR" --device cuda --backend dali \
            --cache-dir "$WORK/tensor_cache" \
            --out "$LOG/score_synthetic_cuda_dali_tensors_$pass.jsonl"
    done
else
    note score_synthetic_cuda_dali skipped "DALI missing"
fi

# ----------------------------------------------------------------- 7. if time is left
if (( $(left) >= 90 )); then
    score synthetic_cpu 75 "$DATA_DIR" --device cpu --backend pillow
    if [[ -s $LOG/score_synthetic_cuda.jsonl && -s $LOG/score_synthetic_cpu.jsonl ]]; then
        run_step compare_synthetic 20 5 "$PY" "$PROBE" compare \
            --run "cuda=$LOG/score_synthetic_cuda.jsonl" \
            --run "cpu=$LOG/score_synthetic_cpu.jsonl" --out "$LOG/compare_synthetic.json"
    fi
else
    note score_synthetic_cpu skipped "budget: $(left)s left, needs 90s"
fi
run_step doctor 30 10 bash -c '"$@" > "$0"' "$LOG/doctor.json" "${IMGPIPE[@]}" doctor \
    --device cuda --json
run_step probe_transport 25 12 "$PY" "$PROBE" transport --seconds 1.5 \
    --budget "$(probe_budget 25)" --out "$LOG/transport.json"
run_step bench 60 40 bash -c '"$@" > "$0"' "$LOG/bench.json" "${IMGPIPE[@]}" bench \
    --device cuda --backends torch torch:fp16 --batch-sizes 32 128 --seconds 1 \
    --images "$SUBSET_DIR" --json
# Last: a cold torch.compile takes a minute or more; it runs only when that much is left.
run_step probe_compile 150 100 "$PY" "$PROBE" compile --seconds 2 \
    --budget "$(probe_budget 150)" --out "$LOG/compile.json"

# Exit status: 0 when the core checks passed (GPU tests, the fp32 photo and GPU score runs).
core='^(pytest_gpu|score_photos_fp32|score_synthetic_cuda)$'
core_failed=$(awk -F'\t' -v core="$core" '$1 ~ core && $2 != "ok"' "$STEPS" | wc -l)
exit $(( core_failed > 0 ? 1 : 0 ))
