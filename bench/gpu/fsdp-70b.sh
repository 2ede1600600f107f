# FSDP-QLoRA on the Llama-3-70B shape over 2 GPUs: builds the model already in 4-bit, a layer at a time
# (never 140 GB of bf16), then benchmarks training. Usage: bash bench/gpu/fsdp-70b.sh [extra bench args]
source bench/gpu/setup.sh
python -m bench --shape llama-3-70b --nproc 2 --configs '{"training":{"strategy":"fsdp"}}' \
  --steps 6 --warmup 2 --no-merge --work-dir /tmp/bench70 --out $OUT/h200x2-llama-3-70b-fsdp.json "$@"
du -sh /tmp/bench70/model-llama-3-70b
