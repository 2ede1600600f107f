"""Benchmarks, run from a checkout (not part of the installed package): `python -m bench --help`.

    bench/training.py       GPU training throughput and memory (`python -m bench ...`)
    bench/prequantize.py    writes a random model of a real shape already in 4-bit, a layer at a time
    bench/controller/       the controller under 1,000 FineTuneJobs (`python -m bench controller ...`)
    bench/gpu/*.sh          the GPU runs behind bench/README.md's figures; bench/results/ their outputs
"""
