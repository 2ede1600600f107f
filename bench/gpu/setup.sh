# Source on a GPU machine that has torch/transformers/peft but no network: installs the wheels in .whl/
# (see README "Speed on a GPU, and more than one GPU") into /tmp/site and puts them and the project on PYTHONPATH.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
