# Each FSDP rank reading only its own shard (runner.parallel.fsdp_load) through `python -m runner run` on 2 GPUs: a
# Llama-3-8B-shape base saved in 4-bit (5.7 GB), 4 steps, no merge; host memory per rank and GPU memory per
# device sampled by bench/memwatch.py, the logged losses (float32 now). Usage: bash bench/gpu/fsdp-load.sh [SHAPE]
# (SHAPE: llama-3-8b by default; tiny checks the path in seconds)
source bench/gpu/setup.sh
export PYTHONUNBUFFERED=1
SHAPE=${1:-llama-3-8b}
J=/tmp/fsdp-load
python -m bench --shape $SHAPE --write-job $J --prequantize yes >/dev/null
python - $J/job.yaml <<'PY'
import sys, yaml
job = yaml.safe_load(open(sys.argv[1])); s = job["spec"]
s["resources"] = {"gpus": 2}
s["training"].update(strategy="fsdp", maxSteps=4, saveSteps=4, loggingSteps=1)
s["merge"] = {"enabled": False}
yaml.safe_dump(job, open(sys.argv[1], "w"))
PY
du -sh $J/model
EV=$OUT/h200x2-$SHAPE-fsdp-load-events.jsonl
python -m bench.memwatch $EV $OUT/h200x2-$SHAPE-fsdp-load-memory.json --interval 0.25 &
WATCH=$!
timeout ${JOB_TIMEOUT:-150} python -m runner run $J/job.yaml --work-dir /tmp/fsdp-load-work > $EV 2> $OUT/fsdp-load.err
echo "rc=$?"
sleep 1; kill $WATCH 2>/dev/null
grep -h '"phase"\|"progress"\|"result"' $EV | cut -c1-300
grep '^\[runner\]\|^\[rank' $OUT/fsdp-load.err | cut -c1-250
grep -v '^\[runner\]' $OUT/fsdp-load.err | grep -i 'error\|abort\|assert' | sort | uniq -c | sort -rn | head -20
tail -n 30 $OUT/fsdp-load.err | cut -c1-300
cat $OUT/h200x2-$SHAPE-fsdp-load-memory.json
