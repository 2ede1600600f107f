# Source on a GPU machine that has torch/transformers/peft but no network: a venv beside the machine's own torch
# (its site-packages after the venv's own, through a .pth file: the machine's python3 is itself a venv, which
# --system-site-packages would skip) with every other package at the version and hash of the runner's GPU lock
# (locks/runner.txt), from the wheels carried in .whl/lock*/ (fetched here by bench/gpu/fetch-wheels.sh; packages
# the machine already has at the locked version are not installed again). The checkout goes on PYTHONPATH.
VENV=${LOCK_VENV:-/tmp/lock-venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    python3 -c 'import site; print("\n".join(site.getsitepackages()))' \
        > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/machine-site.pth"
fi
# .whl/lock* : one folder a carry when the wheels are more than one call can carry (64 MiB)
dirs=$(ls -d .whl/lock* 2>/dev/null)
if [ -n "$dirs" ]; then
    "$VENV/bin/python" bench/gpu/lockfile.py need $dirs > /tmp/lock-need.txt
    if [ -s /tmp/lock-need.txt ]; then
        "$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --require-hashes \
            $(for d in $dirs; do echo --find-links "$d"; done) -r /tmp/lock-need.txt
    fi
else
    : > /tmp/lock-need.txt
    echo "setup.sh: no .whl/lock (bash bench/gpu/fetch-wheels.sh here, then carry .whl/lock)" >&2
fi
export PATH="$VENV/bin:$PATH"
export PYTHONPATH=$PWD
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# Optional: Unsloth (bench/frontier.py) in its own folder, since it needs trl <= 1.15 and datasets < 5. Its wheels
# are unzipped (pure Python; the unsloth wheel is carried without its 26 MB `studio/` web app). To fetch them:
#   for p in unsloth==2026.10.9 unsloth-zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 cut_cross_entropy==25.1.1; do
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl/unsloth $p; done
#   zip -q -d .whl/unsloth/unsloth-2026.10.9-py3-none-any.whl 'studio/*'   # 28.6 MB -> 2.3 MB
if ls .whl/unsloth/*.whl >/dev/null 2>&1; then
    python3 -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall("/tmp/site-unsloth") for w in sys.argv[1:]]' .whl/unsloth/*.whl
fi
