"""The training data: rows read from a file, each turned into text with its loss spans, tokenized.

    dataset  load rows (JSONL, JSON, CSV, Parquet, text), format them (instruction, chat, text, templates),
             tokenize with a loss mask, pack
    chat     chat templates: how a conversation becomes training text

Imports: runner.api only.
"""
