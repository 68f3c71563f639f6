#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment: tools/bootstrap.sh VENV EXTRAS
#
# Why a script and not one pip line: pip's resolver, asked for "torch>=2.6" on a machine
# without torch, downloads the multi-GB CUDA build from PyPI even on a CPU-only machine.
# So torch is settled first, in this order:
#   1. a torch the user already has is kept (the venv then sees the system site-packages);
#   2. a local CPU wheel (pip's find-links, e.g. torch==2.13.0 on the project machines);
#   3. a CUDA machine (nvidia-smi present) gets PyPI's default build;
#   4. anything else gets the CPU build from download.pytorch.org.
# Then the package itself is installed editable with the requested extras.
set -euo pipefail
venv=${1:-.venv}
extras=${2:-dev}
python=${PYTHON:-python3}
torch_local=${TORCH_LOCAL:-torch==2.13.0}

if [ ! -x "$venv/bin/python" ]; then
    if "$python" -c "import torch" >/dev/null 2>&1; then
        echo "bootstrap: reusing the torch already installed for $python"
        "$python" -m venv --system-site-packages "$venv"
    else
        "$python" -m venv "$venv"
    fi
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    # --no-index: only a wheel on this disk (pip's find-links) may satisfy it; its own
    # dependencies then come from the index as usual.
    if "${pip[@]}" install -q --no-index --no-deps "$torch_local" >/dev/null 2>&1; then
        "${pip[@]}" install -q "$torch_local"
        echo "bootstrap: installed $torch_local from the local wheel"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        "${pip[@]}" install -q "torch>=2.6"
    else
        echo "bootstrap: no GPU found, installing the CPU build of torch"
        "${pip[@]}" install -q "torch>=2.6" --index-url https://download.pytorch.org/whl/cpu
    fi
fi
"${pip[@]}" install -q -e ".[$extras]"
"$venv/bin/python" -c "import torch, moekit; print(f'bootstrap: moekit {moekit.__version__}, torch {torch.__version__}')"
