# Several nodes on one host: the 8B job as 2 "nodes" of 1 GPU each (two runner launchers, torchrun c10d
# rendezvous and NCCL over loopback, PET_* as the README's "Several nodes" says) against one node of 2 GPUs.
# Usage: bash bench/gpu/two-nodes.sh   (events and logs land in $OUT)
source bench/gpu/setup.sh
J=/tmp/nodes
python -m bench --shape llama-3-8b --write-job $J >/dev/null
python - "$J" <<'PY'
import sys, yaml
d = sys.argv[1]
job = yaml.safe_load(open(f"{d}/job.yaml"))
s = job["spec"]
s["training"].update(maxSteps=25, saveSteps=1000, loggingSteps=5, strategy="data")
s["merge"] = {"enabled": False}
for name, res in (("one-node", {"gpus": 2}), ("two-nodes", {"gpus": 1, "nodes": 2})):
    s["resources"] = res
    s["output"] = {"destination": f"{d}/out-{name}"}
    yaml.safe_dump(job, open(f"{d}/{name}.yaml", "w"))
PY
timeout 200 python -m runner run $J/one-node.yaml > $OUT/one-node.jsonl 2> $OUT/one-node.err; echo "one-node rc=$?"
export PET_MASTER_ADDR=127.0.0.1 PET_MASTER_PORT=29533
CUDA_VISIBLE_DEVICES=1 PET_NODE_RANK=1 PET_LOCAL_ADDR=127.0.0.2 timeout 200 python -m runner run $J/two-nodes.yaml \
  --work-dir $J/work-1 > $OUT/node1.jsonl 2> $OUT/node1.err &
CUDA_VISIBLE_DEVICES=0 PET_NODE_RANK=0 timeout 200 python -m runner run $J/two-nodes.yaml --work-dir $J/work-0 \
  > $OUT/two-nodes.jsonl 2> $OUT/two-nodes.err; echo "node0 rc=$?"
wait; echo "node1 done"
for f in one-node two-nodes; do echo "== $f"; grep -h '"progress"' $OUT/$f.jsonl | tail -3 | cut -c1-220
  grep -h '"result"' $OUT/$f.jsonl | cut -c1-300; done
tail -n 3 $OUT/two-nodes.err $OUT/node1.err
