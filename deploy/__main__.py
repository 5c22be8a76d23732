"""`python -m deploy analyze DIR --out REPORT`: a corpus run on the deployed Modal app's corpus worker."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.constants import ORIGINAL_CAP_SECONDS
from runtime.errors import ConfigError, InputError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    an = sub.add_parser("analyze", help="score folders on the deployed Modal app (journal, resume, report as locally)")
    an.add_argument("files", nargs="+", type=Path, metavar="FILE_OR_DIR")
    an.add_argument("--out", type=Path, required=True, metavar="REPORT_DIR")
    an.add_argument("--recursive", action="store_true", help="include files in subfolders")
    an.add_argument("--cap-seconds", type=float, nargs="?", const=ORIGINAL_CAP_SECONDS, metavar="N",
                    help=f"analyse only the first N s of each file (bare flag: {ORIGINAL_CAP_SECONDS:.0f} s)")
    return parser


def cmd_analyze(args: argparse.Namespace) -> int:
    from deploy.modal_corpus import lookup_worker, modal_results
    from runtime.corpus.runner import find_audio, run_corpus, summary_lines

    files = find_audio(args.files, recursive=args.recursive)
    try:
        summary = run_corpus(files, args.out, modal_results(lookup_worker(), args.cap_seconds), model=None,
                             cap_seconds=args.cap_seconds, progress=sys.stderr.isatty())
    except KeyboardInterrupt:
        print(f"interrupted: finished files are in {args.out}/journal.jsonl; run again to resume", file=sys.stderr)
        return 130
    print("\n".join(summary_lines(summary)))
    return 1 if summary.failed else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"analyze": cmd_analyze}[args.command](args)
    except (ConfigError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
