# The 8B job as a user runs it on one GPU: `python -m runner run` on a random Llama-3-8B-shape model and
# generated data (30 steps), Validating -> ... -> Succeeded, with the plan line, every phase's time, the
# shard-by-shard merge and its checks. Usage: bash bench/gpu/job-8b.sh   (events and logs land in $OUT)
source bench/gpu/setup.sh
J=/tmp/job-8b
python -m bench --shape llama-3-8b --write-job $J >/dev/null
timeout ${JOB_TIMEOUT:-400} python -m runner run $J/job.yaml > $OUT/job-8b-events.jsonl 2> $OUT/job-8b.err
echo "rc=$?"
grep -h '"phase"\|"result"' $OUT/job-8b-events.jsonl | cut -c1-600
grep -h 'plan:\|merge' $OUT/job-8b.err | cut -c1-400
python - $J/output/report/metrics.json <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(json.dumps({k: m.get(k) for k in ("plan", "phaseSeconds", "estimate", "train_runtime", "mergeCheck", "train_loss", "global_step")}, indent=1))
PY
ls -la $J/output | head -20
tail -n 5 $OUT/job-8b.err
