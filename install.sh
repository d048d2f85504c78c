#!/usr/bin/env bash
# Create (or update) the pvt_d2 Python environment. Idempotent: a second run
# only checks a stamp file and returns in seconds.
#
#   bash install.sh            # creates ./.venv
#   PVT_D2_VENV=/path bash install.sh
#   bash install.sh --print-python   # only print the python of the environment it would use (the Makefile's)
#
# When run inside an already-activated virtualenv or conda environment
# ($VIRTUAL_ENV / $CONDA_PREFIX) it installs into that environment instead, and
# an existing detectron2 (for example one built from source) is kept untouched.
set -euo pipefail
cd "$(dirname "$0")"

TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
D2_WHEEL=sal-detectron2==0.7.2

if [ -n "${PVT_D2_VENV:-}" ]; then
  VENV="$PVT_D2_VENV"
elif [ -n "${VIRTUAL_ENV:-}" ]; then
  VENV="$VIRTUAL_ENV"
elif [ -n "${CONDA_PREFIX:-}" ]; then
  VENV="$CONDA_PREFIX"
else
  VENV=.venv
fi
PY="$VENV/bin/python"
if [ "${1:-}" = "--print-python" ]; then
  echo "$PY"
  exit 0
fi

if [ ! -x "$PY" ]; then
  echo "[install] creating virtual environment $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi

# The stamp covers everything that decides what gets installed.
stamp_file="$VENV/.pvt_d2_install_stamp"
stamp=$(cat install.sh requirements.txt setup.py | sha256sum | cut -c1-16)
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] \
   && (py_abs="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" && cd / \
       && "$py_abs" -c "import torch, torchvision, detectron2, timm, pvt_d2") 2>/dev/null; then
  echo "[install] $VENV is up to date"
  exit 0
fi

pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch, torchvision, sys; sys.exit(0 if torch.__version__.split('+')[0]=='$TORCH_VERSION' else 1)" 2>/dev/null; then
  if "$PY" -c "import torch" 2>/dev/null && [ "$VENV" != ".venv" ]; then
    echo "[install] keeping the torch already installed in $VENV: $("$PY" -c 'import torch; print(torch.__version__)')"
  else
    echo "[install] torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
    pip_install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
  fi
fi

echo "[install] requirements.txt"
pip_install -r requirements.txt
# The linter .ci/run runs before the tests (rules in ruff.toml); pinned so a new release adds no findings.
pip_install "ruff==0.17.6"

# detectron2: keep a user's own build; otherwise install the redistributed wheel.
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
d2_origin=$("$PY" - "$SITE" <<'PYEOF'
import importlib.util, os, sys
site = sys.argv[1]
spec = importlib.util.find_spec("detectron2")
if spec is None:
    print("missing")
elif os.path.exists(os.path.join(site, "detectron2", ".pvt_d2_managed")):
    print("ours")
else:
    print("user:" + os.path.dirname(spec.origin))
PYEOF
)
case "$d2_origin" in
  user:*)
    echo "[install] keeping existing detectron2 at ${d2_origin#user:}" ;;
  *)
    echo "[install] detectron2 from $D2_WHEEL (Python package; torchvision ops replace its _C)"
    "$PY" -m pip install --disable-pip-version-check -q --no-deps --target "$SITE" --upgrade \
      --python-version 3.10 --only-binary=:all: "$D2_WHEEL"
    # The wheel ships a stray top-level 'tools' package that shadows ours.
    rm -rf "$SITE/tools"
    touch "$SITE/detectron2/.pvt_d2_managed" ;;
esac

# Optional ONNX export check (about 40 MB of wheels); PVT_D2_NO_ONNX=1 skips it.
if [ -z "${PVT_D2_NO_ONNX:-}" ]; then
  echo "[install] onnx, onnxscript, onnxruntime (pvt-d2-export --format onnx)"
  pip_install onnx onnxscript onnxruntime
fi

echo "[install] pvt_d2 (editable)"
pip_install --no-deps --no-build-isolation -e .

"$PY" -c "import torch, torchvision, detectron2, timm, pvt_d2; print('[install] ok: torch', torch.__version__, '| torchvision', torchvision.__version__, '| detectron2', detectron2.__version__, '| timm', timm.__version__)"
echo "$stamp" > "$stamp_file"
