"""`python -m bench.attn_bench [TOKENS ...]`: one Llama-3-8B attention layer's forward + backward on one causal
sequence (32 query heads, 8 KV heads, head dim 128, bf16), per kernel: PyTorch's varlen flash kernel (what packed
rows use) and SDPA's cuDNN, flash and memory-efficient backends. Prints one JSON line of milliseconds and TFLOP/s."""
from __future__ import annotations

import json
import sys

import torch


def _time(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main(lengths: list[int]) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.varlen import varlen_attn

    from runner.model import attention

    out = {}
    for s in lengths:
        q = torch.randn(1, 32, s, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, 8, s, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, 8, s, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(1, s, 32, 128, device="cuda", dtype=torch.bfloat16)
        cu = torch.tensor([0, s], device="cuda", dtype=torch.int32)
        flops = 3.5 * 4 * 32 * 128 * s * s / 2  # causal forward 4*h*d*s^2/2; backward 2.5x
        row = {}

        def varlen():
            qq, kk, vv = (t.transpose(1, 2).reshape(s, t.shape[1], 128) for t in (q, k, v))
            kk, vv = kk.repeat_interleave(4, dim=1), vv.repeat_interleave(4, dim=1)
            o = varlen_attn(qq, kk, vv, cu, cu, s, s, **attention._causal_kwargs())
            o.reshape(1, s, 32, 128).backward(g)

        cases = {"varlen": varlen, "chosen": lambda: attention.single_sequence(q, k, v).backward(g)}
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                              ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            def run(b=backend):
                with sdpa_kernel([b]):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                     enable_gqa=True).transpose(1, 2).backward(g)
            cases[name] = run
        for name, fn in cases.items():
            try:
                ms = _time(fn)
                row[name] = {"ms": round(ms, 2), "tflops": round(flops / ms / 1e9, 1)}
            except Exception as e:  # a backend that does not take this shape
                row[name] = {"error": str(e)[:160]}
            q.grad = k.grad = v.grad = None
        out[str(s)] = row
    return out


if __name__ == "__main__":
    print(json.dumps(main([int(x) for x in sys.argv[1:]] or [8192, 32768, 65536])), flush=True)
