"""`python -m deploy analyze | check | smoke`: corpus runs on Modal, the pre-deploy check, the smoke check."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from runtime.constants import ORIGINAL_CAP_SECONDS
from runtime.errors import ConfigError, InputError, ModelError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    an = sub.add_parser("analyze", help="score folders on the deployed Modal app (journal, resume, report as locally)")
    an.add_argument("files", nargs="+", type=Path, metavar="FILE_OR_DIR")
    an.add_argument("--out", type=Path, required=True, metavar="REPORT_DIR")
    an.add_argument("--recursive", action="store_true", help="include files in subfolders")
    an.add_argument("--cap-seconds", type=float, nargs="?", const=ORIGINAL_CAP_SECONDS, metavar="N",
                    help=f"analyse only the first N s of each file (bare flag: {ORIGINAL_CAP_SECONDS:.0f} s)")

    ck = sub.add_parser("check", help="refuse a model that cannot serve on the target (modal deploy runs it too)")
    ck.add_argument("--target", choices=("gpu", "cpu"), required=True)
    ck.add_argument("--model", type=Path, help="the model file (default: the target's, see deploy.checks.DEFAULTS)")
    ck.add_argument("--allow-demo", action="store_true", help="accept a demo model (random weights)")

    sm = sub.add_parser("smoke", help="post the shipped clips to a deployed service and compare with the local runtime")
    sm.add_argument("url", help="the service's base URL (what modal deploy printed, or http://127.0.0.1:8000)")
    sm.add_argument("--model", type=Path, required=True, help="the model file the service was deployed with")
    sm.add_argument("--token", help="bearer token (default: PERCEPIANO_API_TOKEN)")
    sm.add_argument("--clips", type=Path, nargs="+", help="audio files to post (default: convert/clips/*.flac)")
    sm.add_argument("--repeat", type=int, default=3, help="requests per clip (default 3): the first is cold")
    sm.add_argument("--json", action="store_true", help="print the report as JSON")
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


def cmd_check(args: argparse.Namespace) -> int:
    from deploy.checks import default_model, problems, summary

    model = args.model or default_model(args.target)
    found = problems(model, args.target, allow_demo=args.allow_demo)
    for line in found:
        print(f"refused: {line}", file=sys.stderr)
    if found:
        return 1
    print(f"ok ({args.target}): {summary(model)}")
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    from deploy.smoke import SmokeError, shipped_clips, smoke

    if args.repeat < 1:
        raise ConfigError("--repeat must be at least 1")
    clips = args.clips or shipped_clips()
    if not clips:
        raise ConfigError("no clips to post: pass --clips")
    try:
        report = smoke(args.url, args.model, clips, args.token or os.environ.get("PERCEPIANO_API_TOKEN"),
                       args.repeat)
    except SmokeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else "\n".join(report.lines()))
    return 0 if report.passed else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"analyze": cmd_analyze, "check": cmd_check, "smoke": cmd_smoke}
    try:
        return commands[args.command](args)
    except (ConfigError, InputError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
