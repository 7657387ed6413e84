#!/usr/bin/env bash
# Set up blender-chat in a virtual environment (first time only), then run it.
#   ./setup.sh run          set up and run the bot (the default)
#   ./setup.sh chat         set up and chat in the terminal
#   ./setup.sh test [ARGS]  set up with the test tools and run the test suite
# Any other arguments go to `blender-chat`. VENV=path picks the environment (default .venv).
set -euo pipefail
cd "$(dirname "$0")"

venv=${VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"

if ! "$py" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        "$py" -m pip install torch            # with CUDA
    else
        # The CPU build: plain `pip install torch` would pull several GB of CUDA libraries.
        "$py" -m pip install torch --index-url https://download.pytorch.org/whl/cpu
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
