"""`cgc-lora inspect DIR`: the gate report of a saved adapter (see adapter/gate_report.py).

It prints the shared / task-specific split per task; with --out it also writes gates.csv (the full
task x layer x expert table) and gates.png (the heatmap) into that new directory, never into DIR."""

from __future__ import annotations

import argparse
import os

from ..data.reader import UserError
from .arguments import add_overwrite
from .common import log
from .output import staged_output


def register(subparsers) -> None:
    """`cgc-lora inspect`: its parser, run by cmd_inspect."""
    p = subparsers.add_parser("inspect", help="gate weights per task and layer: shared vs task-specific, heatmap PNG")
    p.add_argument("dir", help="a directory written by CGCModel.save_pretrained (or `cgc-lora train`)")
    p.add_argument("--out", help="output directory for gates.csv and gates.png (default: print the table only)")
    add_overwrite(p)
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Run `cgc-lora inspect` on parsed arguments; a bad directory is a UserError (one line)."""
    from ..adapter.gate_report import gate_table_from_dir, plot_gate_heatmap

    try:
        table = gate_table_from_dir(args.dir)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    if args.out is None:
        log(table.format())
        return 0
    with staged_output(args.out, overwrite=args.overwrite, inputs=[args.dir]) as staging:
        log(table.format())
        table.to_csv(os.path.join(staging, "gates.csv"))  # first: it needs no plotting library
        plot_gate_heatmap(table, os.path.join(staging, "gates.png"))
    log(f"wrote gates.csv and gates.png in {os.path.abspath(args.out)}")
    return 0
