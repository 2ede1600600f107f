"""The training data: rows read from a file, each turned into text with its loss spans, tokenized.

    dataset    load rows (JSONL, JSON, CSV, Parquet, text), format them (instruction, chat, text, templates),
               tokenize with a loss mask
    tokenized  the tokenized dataset on disk: memory-mapped Arrow files, its key, parallel tokenizing
    files      a source's data files (one file or a folder of shards): problems, row counts, samples, content hash
    sampled    the rows preview reads: a sample, or every row
    chat       chat templates: how a conversation becomes training text

Imports: runner.api only.
"""
