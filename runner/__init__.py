"""The runner: one FineTuneJob spec in; model and data pulled, trained, merged, published, every phase reported.

Packages, lowest layer first; each imports only the layers below it (tests/test_layout.py checks it):

    api       the FineTuneJob contract shared with the controller: spec, parsing, status, errors, names, cost
    data      rows read (files and shards), formatted into text with loss spans, tokenized into memory-mapped Arrow
    store     every place files live (local, S3, GCS, the Hub) behind one interface: download, publish, checkpoints,
              the lease, the shared model cache
    model     the base loaded 4-bit/8-bit/16-bit with LoRA, its files, attention kernels
    parallel  several processes: the launcher, ranks, FSDP loading
    report    events, console, status patches, trackers, the published report and model card
    train     the Plan, the memory modes and kernels, the trainer with durable checkpoints, the data tokenized
              once per dataset and kept beside them
    merge     the adapter folded into a 16-bit base, shard by shard, and checked

At the top: job (one job start to finish, phase by phase), preview (what will be trained, before any GPU is
held), __main__ (the command line), quickstart/ (the embedded CPU job).
"""


def version() -> str:
    """The version of the installed distribution holding this package (its metadata: pyproject.toml's), for both
    command lines' --version; "unknown" on a checkout used without installing it."""
    from importlib import metadata

    for dist in metadata.distributions():  # top_level.txt first: reading every distribution's RECORD is slow
        if __name__ in (dist.read_text("top_level.txt") or "").split():
            return dist.version
    for name in metadata.packages_distributions().get(__name__, []):
        return metadata.version(name)
    return "unknown"


def add_version_flag(parser) -> None:
    """`--version` on a command line (argparse), looked up only when asked for."""
    import argparse

    class Version(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"{parser.prog} {version()}")
            parser.exit()

    parser.add_argument("--version", nargs=0, action=Version, help="print the version and exit")
