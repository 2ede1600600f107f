"""`python -m bench` - the benchmarks, from a checkout.

    python -m bench --shape llama-3-8b --configs notebook,defaults,lean --out result.json  # GPU training
    python -m bench controller --jobs 1000                                              # the controller
    python -m bench frontier --out frontier.json          # runner vs Unsloth: throughput, memory, long sequences
    python -m bench table                                 # bench/README.md's runner-vs-Unsloth tables from results
    python -m bench throughput                            # the cost estimate's throughput table from results
    python -m bench data                                  # corpora of 100k-5M rows: memory, tokenizing, preview

The first form is the training benchmark (bench/training.py); `python -m bench --help` lists its options.
`controller` runs bench/controller/bench.py (the same as `python -m bench.controller.bench`) with the rest of
the arguments.
"""
from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="GPU training benchmark: the classic QLoRA notebook recipe vs the runner's defaults "
                    "(bench/training.py). `python -m bench controller --help`: the controller benchmark.")
    p.add_argument("--shape", default="llama-3-8b", help="tiny, llama-2-7b, llama-3-8b, llama-3-70b")
    p.add_argument("--configs", default="notebook,defaults,lean",
                   help="comma (or ;) list: notebook, defaults, lean, lora16, lora8, or JSON spec overrides")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="steps excluded from the timing")
    p.add_argument("--work-dir", default="/tmp/finetune-bench")
    p.add_argument("--model-dir", default=None, help="reuse a saved random model")
    p.add_argument("--out", default=None, help="write the JSON result here")
    p.add_argument("--no-merge", dest="merge", action="store_false", help="skip the merge timing")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes (GPUs) per configuration; the strategy is the spec's (auto, data, fsdp)")
    p.add_argument("--prequantize", choices=["auto", "yes", "no"], default="auto",
                   help="write the random model already in 4-bit, a layer at a time (auto: for shapes whose "
                        "bf16 weights exceed 64 GiB, e.g. llama-3-70b)")
    p.add_argument("--loss-check", action="store_true",
                   help="log every step's loss and compare the first two configurations (fast vs reference)")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    p.add_argument("--single-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--write-job", default=None, metavar="DIR",
                   help="instead: write a random model, a dataset and a job.yaml for `python -m runner run`")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["controller"]:
        from bench.controller import bench as controller_bench

        sys.argv = ["python -m bench controller", *argv[1:]]
        return controller_bench.main()
    if argv[:1] == ["table"]:
        from bench import table

        return table.main(argv[1:])
    if argv[:1] == ["throughput"]:
        from bench import throughput

        return throughput.main(argv[1:])
    if argv[:1] == ["data"]:
        from bench import data

        return data.main(argv[1:])
    if argv[:1] == ["frontier"]:
        from bench import frontier

        return frontier.main(frontier.parser().parse_args(argv[1:]))
    args = parser().parse_args(argv)
    from bench import training

    return training.main(args)


if __name__ == "__main__":
    sys.exit(main())
