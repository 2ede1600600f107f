# The 70B job end to end on 2 GPUs, as a user runs it: `python -m runner run` with resources.gpus 2 and
# training.strategy fsdp on a random Llama-3-70B-shape base saved already in 4-bit (37 GB), 6 steps of 4 packed
# rows of 2048, then the shard-by-shard merge into fp16 (141 GB) and the local publish. Records each phase's
# time and peak memory (GPU per rank, host memory per process: bench/memwatch.py) and checks the output shard
# by shard against its index. Usage: bash bench/gpu/job-70b.sh   (results in $OUT/h200x2-llama-3-70b-job.json)
#
# Space: the merged fp16 output (131.4 GiB) must lie in one filesystem, with the work directory that stages it
# (the local publish hard-links the staged shards into the destination). The disk of a 2 x H200 machine is
# 128 GiB, so the output goes to a tmpfs (/dev/shm, grown with a remount if it is smaller; the machine has
# 256 GiB of memory) and the 4-bit base to whichever filesystem has room beside it.
source bench/gpu/setup.sh
T0=$(date +%s)
LOG=$OUT/job-70b.log
exec > >(tee -a $LOG) 2>&1
export PYTHONUNBUFFERED=1
gib() { df -B1G --output=avail "$1" | tail -1 | tr -d ' '; }
{ df -h / /tmp /dev/shm; free -g; nproc; nvidia-smi --query-gpu=name,memory.total --format=csv; } | tee $OUT/machine.txt
if [ "$(gib /dev/shm)" -lt 150 ]; then
  mount -o remount,size=200G /dev/shm && echo "remounted /dev/shm with size=200G" || echo "could not grow /dev/shm"
fi
SHM=$(gib /dev/shm); DISK=$(gib /tmp)
echo "free: /dev/shm ${SHM} GiB, /tmp ${DISK} GiB"
if [ "$SHM" -ge 140 ]; then OUTFS=/dev/shm; elif [ "$DISK" -ge 140 ]; then OUTFS=/tmp; else
  echo "no filesystem holds the 131.4 GiB output: /dev/shm ${SHM} GiB, /tmp ${DISK} GiB"; exit 3; fi
if [ "$OUTFS" = /dev/shm ] && [ "$DISK" -ge 40 ]; then BASEFS=/tmp; elif [ "$OUTFS" = /tmp ] && [ "$SHM" -ge 40 ]; then
  BASEFS=/dev/shm; else BASEFS=$OUTFS; fi
echo "layout: base in $BASEFS, work directory and output in $OUTFS"
J=$BASEFS/job70; W=$OUTFS/work70; D=$OUTFS/out70
rm -rf $W $D $D.checkpoints /tmp/smoke

# 1. While the 70B base is written (GPU 0, ~50 s), a tiny pre-quantized FSDP job checks the sharded loader on
#    these GPUs; if it fails, the 70B job loads the old way (every rank the whole model) and says so.
(python -m bench --shape llama-3-70b --write-job $J --prequantize yes > $OUT/build.txt 2>&1; echo "build rc=$?" >> $OUT/build.txt) &
BUILD=$!
python -m bench --shape tiny --write-job /tmp/smoke --prequantize yes >/dev/null 2>&1
python - /tmp/smoke/job.yaml /tmp/smoke/output <<'PY'
import sys, yaml
job = yaml.safe_load(open(sys.argv[1])); s = job["spec"]
s["resources"] = {"gpus": 2}
s["training"].update(strategy="fsdp", maxSteps=4, saveSteps=4, loggingSteps=1)
s["dataset"]["maxLength"] = 256
yaml.safe_dump(job, open(sys.argv[1], "w"))
PY
timeout 150 python -m runner run /tmp/smoke/job.yaml --work-dir /tmp/smoke/work > /tmp/smoke/events.jsonl 2> /tmp/smoke/err
SMOKE=$?
echo "smoke rc=$SMOKE"; grep -h '"progress"\|"result"' /tmp/smoke/events.jsonl | cut -c1-300
echo "smoke stderr lines: $(wc -l < /tmp/smoke/err); [runner] lines: $(grep -c '^\[runner\]' /tmp/smoke/err); [rank 1] lines: $(grep -c '^\[rank 1\]' /tmp/smoke/err)"
grep '^\[runner\]' /tmp/smoke/err | cut -c1-200
if [ $SMOKE -ne 0 ]; then
  grep -v '^\[runner\]' /tmp/smoke/err | grep -i 'error\|abort\|assert' | sort | uniq -c | sort -rn | head -20
  tail -n 40 /tmp/smoke/err; export FINETUNE_FSDP_LOAD=full
fi
wait $BUILD; cat $OUT/build.txt | tail -3
rm -rf /tmp/smoke

# 2. The job: 6 steps, a checkpoint at the end, merged into fp16 and published to $D.
python - $J/job.yaml $D <<'PY'
import sys, yaml
job = yaml.safe_load(open(sys.argv[1])); s = job["spec"]
s["resources"] = {"gpus": 2}
s["training"].update(strategy="fsdp", maxSteps=6, saveSteps=6, loggingSteps=1)
s["output"]["destination"] = sys.argv[2]
yaml.safe_dump(job, open(sys.argv[1], "w"))
PY
du -sh $J/model
EV=$OUT/h200x2-llama-3-70b-job-events.jsonl
python -m bench.memwatch $EV $OUT/memwatch.json --interval 0.5 &
WATCH=$!
LEFT=$(( 555 - ($(date +%s) - T0) - 45 ))
echo "job starts at $(( $(date +%s) - T0 )) s; time limit ${LEFT} s; FINETUNE_FSDP_LOAD=${FINETUNE_FSDP_LOAD:-sharded}"
timeout $LEFT python -m runner run $J/job.yaml --work-dir $W > $EV 2> $OUT/job-70b.err
RC=$?
echo "job rc=$RC at $(( $(date +%s) - T0 )) s"
sleep 1; kill $WATCH 2>/dev/null
grep -h '"phase"\|"result"\|"checkpoint"' $EV | cut -c1-400
grep -h '"progress"' $EV | cut -c1-250
grep '^\[runner\]\|^\[rank' $OUT/job-70b.err | cut -c1-300
tail -n 8 $OUT/job-70b.err | cut -c1-400

# 3. The output, shard by shard with its index; then the results in one document.
python - $D $EV $OUT/memwatch.json $OUT/h200x2-llama-3-70b-job.json "$OUTFS" "$BASEFS" "$RC" <<'PY'
import json, sys, time, os
from pathlib import Path
from safetensors import safe_open
d, ev, mw, out, outfs, basefs, rc = Path(sys.argv[1]), *sys.argv[2:]
events = [json.loads(l) for l in open(ev) if l.strip()]
res = {"exitCode": int(rc), "layout": {"base": basefs, "workAndOutput": outfs},
       "fsdpLoad": os.environ.get("FINETUNE_FSDP_LOAD", "sharded"),
       "phases": [(e["phase"], e["time"]) for e in events if e["event"] == "phase"],
       "result": next((e for e in events if e["event"] == "result"), None),
       "losses": [(e.get("step"), e.get("loss")) for e in events if e["event"] == "progress" and "loss" in e],
       "progress": [e for e in events if e["event"] == "progress"][-1:]}
try:
    res["memory"] = json.load(open(mw))
except Exception as e:
    res["memory"] = repr(e)
try:
    m = json.load(open(d / "report" / "metrics.json"))
    res["metrics"] = {k: m.get(k) for k in ("phaseSeconds", "mergeCheck", "train_loss", "global_step", "plan",
                                            "train_runtime", "strategy", "processes")}
except Exception as e:
    res["metrics"] = repr(e)
try:
    t = time.time()
    index = json.load(open(d / "model.safetensors.index.json"))
    shards = sorted(set(index["weight_map"].values()))
    n, total, dtypes = 0, 0, set()
    full = set(shards[:2] + shards[-1:])  # these read whole; of the others, every header and one tensor
    for shard in shards:  # one shard open at a time, as a loader that streams the model does
        with safe_open(str(d / shard), "pt") as f:
            for i, key in enumerate(f.keys()):
                assert index["weight_map"][key] == shard, key
                sl = f.get_slice(key)
                size = {"F16": 2, "BF16": 2, "F32": 4}[sl.get_dtype()]
                for dim in sl.get_shape():
                    size *= dim
                n += 1; total += size; dtypes.add(sl.get_dtype())
                if shard in full or i == 0:
                    x = f.get_tensor(key)
                    assert x.isfinite().all(), key
    cfg = json.load(open(d / "config.json"))
    res["output"] = {"shards": len(shards), "tensors": n, "indexTensors": len(index["weight_map"]),
                     "bytes": total, "indexTotalSize": index["metadata"]["total_size"], "dtypes": sorted(dtypes),
                     "quantizationConfig": "quantization_config" in cfg, "readSeconds": round(time.time() - t, 1),
                     "files": sorted(p.name for p in d.iterdir())[:12]}
except Exception as e:
    res["output"] = repr(e)
Path(out).write_text(json.dumps(res, indent=1, default=str))
print(json.dumps({k: res[k] for k in ("exitCode", "fsdpLoad", "phases", "losses", "output")}, indent=1, default=str))
print(json.dumps(res.get("memory"), default=str)[:3000])
print(json.dumps(res.get("metrics"), default=str)[:1500])
PY
df -h /tmp /dev/shm; free -g
rm -rf $W $D $D.checkpoints
echo "done at $(( $(date +%s) - T0 )) s"
