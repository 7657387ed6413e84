#!/usr/bin/env bash
# Set up blender-chat in a virtual environment (first time only), then run it.
#   ./setup.sh run          set up and run the bot (the default)
#   ./setup.sh chat         set up and chat in the terminal
#   ./setup.sh test [ARGS]  set up with the test tools and run the test suite
# Any other arguments go to `blender-chat`. VENV=path picks the environment (default .venv);
# TORCH_INDEX_URL=url another index for the CPU build of torch (default PyTorch's own).
set -euo pipefail
cd "$(dirname "$0")"

venv=${VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"

# The torch versions the project supports: pyproject.toml's range, e.g. torch>=2.4,<2.15.
torch_spec=$(sed -n 's/^ *"\(torch[<>=!~][^"]*\)",.*/\1/p' pyproject.toml)
torch_spec=${torch_spec:-torch}
torch_index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}

if ! "$py" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        "$py" -m pip install "$torch_spec"            # with CUDA
    elif "$py" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=15)" "$torch_index/torch/" 2>/dev/null; then
        # The CPU build: plain `pip install torch` would pull several GB of CUDA libraries.
        "$py" -m pip install "$torch_spec" --index-url "$torch_index"
    else
        echo "setup.sh: cannot reach the CPU build's index ($torch_index); installing torch from the default index instead, a download of several GB (CUDA libraries included)" >&2
        "$py" -m pip install "$torch_spec"
    fi
fi

command=${1:-run}
[ $# -gt 0 ] && shift
if [ "$command" = test ]; then
    "$py" -m pip install -q -e '.[test]'
    exec "$py" -m pytest "$@"
fi
"$py" -m pip install -q -e .
exec "$venv/bin/blender-chat" "$command" "$@"
