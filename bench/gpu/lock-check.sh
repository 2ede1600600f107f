#!/usr/bin/env bash
# On one GPU: what runs there is what the lock says. Installs the runner's GPU lock (locks/runner.txt) into a clean
# venv beside the machine's own torch 2.11.0+cu130 (bench/gpu/setup.sh, wheels carried in .whl/lock), runs the 8B
# job end to end (bench/gpu/job-8b.sh) and the quickstart, and compares `pip freeze` with the lock.
# Usage: bash bench/gpu/lock-check.sh         Results in $OUT: lock-freeze.txt, lock-compare.json, job-8b-*, quickstart.log
#        bash bench/gpu/lock-check.sh plan    only what to carry: the lock packages this machine lacks (for fetch-wheels.sh)
set -uo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = plan ]; then
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    echo "carry: $(python3 bench/gpu/lockfile.py missing)"
    exit 0
fi
export LOCK_VENV=${LOCK_VENV:-/tmp/lock-venv}
rm -rf "$LOCK_VENV"  # clean: everything in it comes from the lock (frontier.sh then reuses it)
source bench/gpu/setup.sh
echo "== venv $LOCK_VENV: $(grep -c "==" /tmp/lock-need.txt) packages installed from .whl/lock*"
python -m pip freeze > "$OUT/lock-freeze.txt"
python bench/gpu/lockfile.py compare "$OUT/lock-compare.json"
echo "== the 8B job"
bash bench/gpu/job-8b.sh
echo "== the quickstart"
timeout 600 python -m runner quickstart --dir /tmp/lock-quickstart > "$OUT/quickstart.log" 2>&1
echo "quickstart rc=$?"
tail -n 25 "$OUT/quickstart.log"
