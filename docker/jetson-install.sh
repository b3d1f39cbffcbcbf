#!/bin/sh
# The Jetson image's Python environment (docker/Dockerfile.jetson), in two steps. tests/deploy/test_py310.py
# runs this same script with a Python 3.10 and PyPI's CPU onnxruntime in place of NVIDIA's GPU build,
# so the image's install cannot drift from what the tests check.
#
#   jetson-install.sh runtime VENV       a venv of $PYTHON (python3: 3.10 on JetPack 6), a current
#                                        pip, and ONNX Runtime: $ORT_PACKAGE (onnxruntime-gpu) from
#                                        $ORT_INDEX (NVIDIA's Jetson index) besides pip's own indexes
#   jetson-install.sh project VENV SRC   the project from SRC with its serve extra less ONNX Runtime
#                                        (`serve-core`: `serve` would put PyPI's CPU build over the
#                                        GPU one, same module name), at constraints.txt's MLflow; then
#                                        checks that step 1's runtime is the one left and no torch came
set -eu
step=${1:?usage: jetson-install.sh runtime VENV | project VENV SRC}
venv=${2:?the virtual environment}
ORT_PACKAGE=${ORT_PACKAGE:-onnxruntime-gpu}
ORT_INDEX=${ORT_INDEX:-}

case "$step" in
runtime)
    "${PYTHON:-python3}" -m venv "$venv"
    # Ubuntu 22.04's pip is 22.0; a current one resolves the serve extra's tree far faster.
    "$venv/bin/pip" install --upgrade pip
    # shellcheck disable=SC2086
    "$venv/bin/pip" install ${ORT_INDEX:+--extra-index-url "$ORT_INDEX"} "$ORT_PACKAGE"
    ;;
project)
    src=${3:?the source tree}
    pins=$(mktemp)
    # The MLflow the rest of the deployment runs (a server never migrates the registry it reads).
    # Only that family: constraints.txt's other pins are for Python 3.11 and some have no 3.10
    # release (numpy 2.3+, onnxruntime 1.24+).
    if [ -f "$src/constraints.txt" ]; then
        grep -E '^(mlflow-skinny|mlflow-tracing)==' "$src/constraints.txt" > "$pins" || true
    fi
    "$venv/bin/pip" install -c "$pins" "$src[serve-core]"
    rm -f "$pins"
    "$venv/bin/pip" check
    ORT_PACKAGE="$ORT_PACKAGE" "$venv/bin/python" - <<'EOF'
import importlib.metadata as md
import importlib.util
import os
import sys

wanted = os.environ["ORT_PACKAGE"]
runtimes = sorted(d.metadata["Name"] for d in md.distributions()
                  if d.metadata["Name"].lower().startswith("onnxruntime"))
assert runtimes == [wanted], f"ONNX Runtime distributions {runtimes}, wanted only {wanted}"
assert importlib.util.find_spec("torch") is None, "torch on the serve path"
import onnxruntime

print(f"Python {sys.version.split()[0]}, {wanted} {onnxruntime.__version__}:",
      ", ".join(onnxruntime.get_available_providers()))
EOF
    ;;
*)
    echo "jetson-install.sh: unknown step $step (runtime | project)" >&2
    exit 2
    ;;
esac
