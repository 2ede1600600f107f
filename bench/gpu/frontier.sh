# The runner against Unsloth on one GPU, one call (bench/frontier.py): packed 4x2048 with memory to spare and
# under 10 GiB, one sequence of each length under a budget of Unsloth's own peak, the lean row profiled.
# Usage: LENGTHS=16384,32768,65536,131072 bash bench/gpu/frontier.sh   (JSON and log land in $OUT; LENGTHS=
# for the packed rows only, FRONTIER_ARGS=--skip-packed for the single sequences only)
source bench/gpu/setup.sh
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
W=/tmp/fr
mkdir -p $W
timeout ${TOTAL_S:-560} python -m bench frontier --shape llama-3-8b --model-dir /tmp/fr-model --work-dir $W \
    --lengths "${LENGTHS-16384,32768,65536,131072}" --steps "${STEPS:-30}" --long-steps "${LONG_STEPS:-2}" \
    --unsloth-timeout "${UNSLOTH_S:-300}" --worker-timeout "${WORKER_S:-300}" ${FRONTIER_ARGS:-} \
    --out $OUT/h200-llama-3-8b-frontier.json > $OUT/frontier.log 2>&1
echo "frontier rc=$?"
for f in runner unsloth-unsloth unsloth-none; do [ -f $W/$f.json ] && cp $W/$f.json $OUT/part-$f.json; done
grep -a '^\[frontier\]\|Error\|error' $OUT/frontier.log | cut -c1-400 | tail -40
