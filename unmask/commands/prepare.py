"""`unmask prepare`: a corpus -> a dataset directory (`unmask.data.prepare` does the work)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unmask.config.command import parse_command
from unmask.config.flags import bounded, check_ranges
from unmask.data.prepare import prepare
from unmask.data.sources import KNOWN_DATASETS
from unmask.errors import UserError


@dataclass
class PrepareArgs:
    data_dir: str = "data"
    """Directory the dataset directory is written into."""
    input: str | None = None
    """A UTF-8 text file to prepare (for shakespeare_char: use this file instead of fetching)."""
    name: str | None = None
    """Dataset name for --input (default: the file's stem)."""
    val_fraction: float = bounded(0.1, 0.0, 1.0, lo_open=True, hi_open=True)
    """Fraction of the characters, taken from the end, that form the validation split."""
    verify: bool = False
    """Instead of preparing: check the prepared dataset's files against the sizes and sha256s in its meta.json."""

    def __post_init__(self) -> None:
        check_ranges(self)


def main(argv: list[str]) -> int:
    """`unmask prepare [DATASET] [flags]`."""
    parsed = parse_command(
        PrepareArgs,
        argv,
        "unmask prepare [DATASET] [flags]",
        f"Prepare a known dataset ({', '.join(KNOWN_DATASETS)}) or any UTF-8 file (--input).",
        max_positional=1,
    )
    if parsed is None:
        return 0
    positional, args = parsed
    dataset = positional[0] if positional else None
    if args.verify:
        from unmask.data.dataset import verify_dataset

        name = args.name or dataset
        if name is None:
            raise UserError("--verify=True: name the dataset (unmask prepare NAME --verify=True)")
        verify_dataset(Path(args.data_dir) / name)
        print(f"{Path(args.data_dir) / name}: intact")
        return 0
    if dataset is None and args.input is None:
        raise UserError(f"unmask prepare: name a dataset ({', '.join(KNOWN_DATASETS)}) or give --input=FILE")
    prepare(dataset, Path(args.input) if args.input else None, args.name, Path(args.data_dir), args.val_fraction)
    return 0
