# FSDP-QLoRA as a user runs it: `runner run` with resources.gpus 2 and training.strategy fsdp on an 8B
# (pre-quantized, random) model; then a resume from the older checkpoint, this time merging (rank 0) into fp16. Usage: bash bench/gpu/fsdp-job.sh
source bench/gpu/setup.sh
J=/tmp/fsdp-job
python -m bench --shape llama-3-8b --write-job $J --prequantize yes >/dev/null
python - "$J" <<'PY'
import sys, yaml
d = sys.argv[1]
job = yaml.safe_load(open(f"{d}/job.yaml"))
s = job["spec"]
s["resources"] = {"gpus": 2}
s["training"].update(strategy="fsdp", maxSteps=4, saveSteps=2, loggingSteps=1)
s["merge"] = {"enabled": False}
yaml.safe_dump(job, open(f"{d}/job.yaml", "w"))
PY
timeout 280 python -m runner run $J/job.yaml > $OUT/run1.jsonl 2> $OUT/run1.err; echo "run1 rc=$?"
ls $J/output.checkpoints $J/output | tee $OUT/ls1.txt
rm -rf $J/output $J/output.checkpoints/checkpoint-4
sed -i 's/enabled: false/enabled: true/' $J/job.yaml  # merge is not part of the checkpoint fingerprint
timeout 200 python -m runner run $J/job.yaml > $OUT/run2.jsonl 2> $OUT/run2.err; echo "run2 rc=$?"
ls -la $J/output | tee $OUT/ls2.txt
grep -h '"progress"\|resuming\|"result"\|strategy' $OUT/run1.jsonl $OUT/run2.jsonl | cut -c1-300
tail -n 5 $OUT/run1.err $OUT/run2.err
