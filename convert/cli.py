"""`python -m convert export | demo-checkpoint`: the converter's command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from convert.errors import CheckpointError, ExportError, ParityError
from runtime.errors import AudioError, ModelError

USER_ERRORS = (CheckpointError, ParityError, ExportError, AudioError, ModelError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    exp = sub.add_parser("export", help="checkpoint -> parity-checked ONNX model")
    exp.add_argument("--checkpoint", type=Path, help="original pickled checkpoint (default: a demo checkpoint)")
    exp.add_argument("--out", type=Path, default=Path("artifacts/model.onnx"), help="output ONNX path")
    exp.add_argument("--opset", type=int, default=23, help="ONNX opset (default 23)")
    exp.add_argument("--atol", type=float, help="fp32 parity tolerance in score units (default 1e-5)")
    exp.add_argument("--clips", type=Path, nargs="+", help="audio files for the parity gate (default: shipped clips)")
    exp.add_argument("--seed", type=int, default=0, help="seed of random parity inputs and of the demo checkpoint")
    exp.add_argument("--report", type=Path, help="also write the parity report(s) as JSON here")

    demo = sub.add_parser("demo-checkpoint", help="write a checkpoint in the original pickle format")
    demo.add_argument("out", type=Path)
    demo.add_argument("--preset", choices=("production", "tiny"), default="production")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def cmd_export(args: argparse.Namespace) -> int:
    from convert.export import export
    from convert.parity import format_report

    try:
        result = export(args.checkpoint, args.out, opset=args.opset, atol=args.atol, clips=args.clips, seed=args.seed)
    except ParityError as exc:
        if exc.report:
            print(format_report(exc.report), file=sys.stderr)
        if args.report and exc.report:
            args.report.write_text(json.dumps(exc.report, indent=2))
        raise
    for report in result.reports.values():
        print(format_report(report))
    if args.report:
        args.report.write_text(json.dumps(result.reports, indent=2))
    for precision, path in result.written.items():
        print(f"wrote {path} ({precision}, {path.stat().st_size / 1e6:.1f} MB) in {result.seconds:.1f} s")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from convert.demo import make_demo_checkpoint

    path = make_demo_checkpoint(args.out, preset=args.preset, seed=args.seed)
    print(f"wrote {path} ({args.preset} preset, seed {args.seed}, {path.stat().st_size / 1e6:.1f} MB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # our own progress at INFO; third-party libraries (jax2onnx is chatty) only at WARNING
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for name in ("convert", "runtime"):
        logging.getLogger(name).setLevel(logging.ERROR if args.quiet else logging.INFO)
    commands = {"export": cmd_export, "demo-checkpoint": cmd_demo}
    try:
        return commands[args.command](args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
