"""`cgc-lora inspect DIR`: the gate report of a saved adapter (see adapter/gate_report.py)."""

from __future__ import annotations

import argparse
import os
import sys

from ..adapter.gate_report import write_gate_report


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `cgc-lora inspect` (for a subcommand parser)."""
    parser.add_argument("dir", help="a directory written by CGCModel.save_pretrained (or `cgc-lora train`)")
    parser.add_argument("--out", help="heatmap PNG (default: DIR/gates.png)")
    parser.add_argument("--csv", help="the full task x layer x expert table (default: DIR/gates.csv)")


def inspect_command(args: argparse.Namespace) -> int:
    """Run `cgc-lora inspect` on parsed arguments; a bad directory ends with one line on stderr
    and status 2."""
    out = args.out or os.path.join(args.dir, "gates.png")
    csv_path = args.csv or os.path.join(args.dir, "gates.csv")
    try:
        write_gate_report(args.dir, out, csv_path)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"cgc-lora inspect: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wrote {out} and {csv_path}")
    return 0
