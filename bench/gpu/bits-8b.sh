# quantization.bits on one GPU, Llama-3-8B shape: the training benchmark's QLoRA (defaults), 16-bit LoRA (lora16)
# and LLM.int8 (lora8) rows, then a whole 16-bit job (`python -m runner run`, 30 steps, merge and its checks).
# Usage: bash bench/gpu/bits-8b.sh   (results, events and logs land in $OUT)
source bench/gpu/setup.sh
export PYTHONUNBUFFERED=1
python - <<'PY'
import torch
from runner.model import load as model
from runner.api.spec import ModelSpec, QuantizationSpec
from bench.training import build_model
d = build_model("llama-3-8b", "/tmp/b/model-llama-3-8b")
m = model.load_base(d, ModelSpec(source=str(d)), QuantizationSpec(bits=16), compute=torch.bfloat16, attention="sdpa")
dtypes = {}
for p in m.parameters():
    dtypes[str(p.dtype)] = dtypes.get(str(p.dtype), 0) + p.numel()
print("16-bit base:", dtypes, f"allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB")
PY
python -m bench --shape llama-3-8b --model-dir /tmp/b/model-llama-3-8b --configs "${CONFIGS:-lora16,defaults,lora8}" \
    --steps "${STEPS:-20}" --warmup 4 --no-merge --work-dir /tmp/b --out $OUT/h200-llama-3-8b-bits.json > $OUT/bench.log 2>&1
echo "bench rc=$?"; grep '^{"' $OUT/bench.log
J=/tmp/job-8b-16
python -m bench --shape llama-3-8b --write-job $J >/dev/null
python - $J/job.yaml <<'PY'
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
doc["spec"]["quantization"] = {"bits": 16}
yaml.safe_dump(doc, open(sys.argv[1], "w"), sort_keys=False)
PY
timeout ${JOB_TIMEOUT:-300} python -m runner run $J/job.yaml > $OUT/job-8b-16-events.jsonl 2> $OUT/job-8b-16.err
echo "job rc=$?"
grep -h '"phase"\|"result"' $OUT/job-8b-16-events.jsonl | cut -c1-400
grep -h 'plan:' $OUT/job-8b-16.err | cut -c1-600
python - $J/output/report/metrics.json <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(json.dumps({k: m.get(k) for k in ("phaseSeconds", "mergeCheck", "train_loss", "global_step", "tensorboard")}))
PY
ls $J/output $J/output/report/tensorboard
