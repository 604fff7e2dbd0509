"""`build-corpus` and `train-tokenizer`: the text data of the embedded model."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sinkprune.cli_args import integer, as_path
from sinkprune.data import corpus, tokenizer
from sinkprune.safe_output import add_overwrite_flag


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the two data commands to the `sinkprune` CLI."""
    build = subparsers.add_parser(
        "build-corpus",
        help="build the English documentation corpus from Debian packages",
        description=corpus.__doc__.splitlines()[0],
    )
    build.add_argument("--out-dir", type=as_path, default=corpus.DEFAULT_OUT_DIR,
                       help="where train.txt and stats.json go (default: %(default)s)")
    build.add_argument("--cache-dir", type=as_path, default=corpus.DEFAULT_CACHE_DIR,
                       help="downloaded and extracted .deb files (default: %(default)s)")
    build.add_argument("--packages", nargs="+", default=list(corpus.DEFAULT_PACKAGES),
                       metavar="PKG", help="Debian documentation packages (default: %(default)s)")
    build.add_argument("--heldout-dir", type=as_path, default=corpus.PACKAGE_CORPUS_DIR,
                       help="where calibration/evaluation .txt.gz go (default: the package data)")
    add_overwrite_flag(build)
    build.set_defaults(func=run_build_corpus)

    train = subparsers.add_parser(
        "train-tokenizer",
        help="train the byte-level BPE tokenizer on the training corpus",
        description=tokenizer.__doc__.splitlines()[0],
    )
    train.add_argument("--train", type=as_path, default=corpus.DEFAULT_OUT_DIR / "train.txt",
                       help="corpus file to train on (default: %(default)s)")
    train.add_argument("--out-dir", type=as_path, default=Path("runs/tokenizer"),
                       help="output directory (default: %(default)s; the shipped one is "
                       "sinkprune/data/tokenizer)")
    train.add_argument("--vocab-size", type=integer(tokenizer.MIN_VOCAB_SIZE, 1_048_576),
                       default=tokenizer.DEFAULT_VOCAB_SIZE,
                       help="vocabulary size including special tokens (default: %(default)s)")
    add_overwrite_flag(train)
    train.set_defaults(func=run_train_tokenizer)


def run_build_corpus(args: argparse.Namespace) -> int:
    """Build the corpus and print its stats, without the per-document ids."""
    from sinkprune.cli import UsageError

    bad = [name for name in args.packages if not name or name.startswith("-") or "/" in name]
    if bad:
        raise UsageError(f"--packages: not Debian package names: {', '.join(bad)}")
    try:
        stats = corpus.build_corpus(args.out_dir, args.cache_dir, args.packages,
                                    heldout_dir=args.heldout_dir, overwrite=args.overwrite)
    except RuntimeError as err:
        raise UsageError(str(err)) from err
    for split in stats["splits"].values():
        split.pop("document_ids")
    print(json.dumps(stats, indent=2, sort_keys=True))
    return 0


def run_train_tokenizer(args: argparse.Namespace) -> int:
    """Train the tokenizer and print where it went."""
    from sinkprune.cli import UsageError
    from sinkprune.safe_output import staged_output

    if not args.train.is_file():
        raise UsageError(f"--train: {args.train} not found; build it with "
                         f"`{corpus.BUILD_COMMAND}` or pass a text file")
    with staged_output(args.out_dir, args.overwrite, ours=tokenizer.WRITES) as staging:
        tokenizer.train_tokenizer(args.train, staging, args.vocab_size)
    print(f"tokenizer written to {args.out_dir}")
    return 0
