# Source on a GPU machine that has torch/transformers/peft but no network: installs the wheels in .whl/
# (see bench/README.md, "On a GPU machine") into /tmp/site and puts them and the project on PYTHONPATH.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
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
