# Source on a GPU machine that has torch/transformers/peft but no network: installs the wheels in .whl/
# (see README "Speed on a GPU, and more than one GPU") into /tmp/site and puts them and the project on PYTHONPATH.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# Optional: Unsloth (bench/frontier.py) in its own folder, since it needs trl <= 1.15 and datasets < 5. Its wheels
# are unzipped (pure Python; the unsloth wheel is carried without its 26 MB `studio/` web app).
if ls .whl/unsloth/*.whl >/dev/null 2>&1; then
    python3 -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall("/tmp/site-unsloth") for w in sys.argv[1:]]' .whl/unsloth/*.whl
fi
