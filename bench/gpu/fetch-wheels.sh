#!/usr/bin/env bash
# Here (with the package registry), before a GPU run: the wheels of the runner's GPU lock (locks/runner.txt) for the
# GPU machines' Python 3.12, every hash checked, into .whl/lock/ - all but the machines' own CUDA stack (torch,
# triton, nvidia-*, cuda-toolkit), which they have preinstalled. Then carry `.whl/lock` (bench/gpu/setup.sh installs
# from it). Usage: bash bench/gpu/fetch-wheels.sh [NAME ...]   (only these packages; default: all of them)
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl/lock
req=$(mktemp)
python3 bench/gpu/lockfile.py carry > "$req"
if [ $# -gt 0 ]; then
    python3 - "$req" "$@" <<'PY'
import re, sys
from pathlib import Path
path, names = Path(sys.argv[1]), {n.lower().replace("_", "-") for n in sys.argv[2:]}
entries = re.split(r"\n(?=\S)", path.read_text())
path.write_text("\n".join(e for e in entries if e.split("==")[0].strip().lower() in names) + "\n")
PY
fi
python3 -m pip download -q --no-deps --require-hashes --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl/lock -r "$req"
rm -f "$req"
du -sh .whl/lock
ls -S .whl/lock | head -5
