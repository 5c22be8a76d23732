"""`python -m convert export | quantize | crosscheck | demo-checkpoint`: the converter's command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from functools import partial
from pathlib import Path

from convert.config import PRESETS
from convert.errors import CheckpointError, ExportError, ParityError
from convert.frontend import DEFAULT_DFT, DFT_CHOICES
from convert.options import (
    BACKENDS,
    DEFAULT_INT8_ACTIVATIONS,
    INT8_ACTIVATIONS,
    QUANTIZE_CHOICES,
    ExportOptions,
    VariantOptions,
)
from runtime.errors import AudioError, ModelError

USER_ERRORS = (CheckpointError, ParityError, ExportError, AudioError, ModelError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    exp = sub.add_parser("export", help="checkpoint -> parity-checked ONNX model")
    exp.add_argument("--checkpoint", type=Path, help="original pickled checkpoint (default: a demo checkpoint)")
    exp.add_argument("--out", type=Path, default=Path("artifacts/model.onnx"), help="output ONNX path")
    exp.add_argument("--opset", type=int, help="ONNX opset (default 23 with jax2onnx, 18 with tf2onnx)")
    exp.add_argument("--backend", choices=BACKENDS, default=ExportOptions.backend,
                     help="converter: jax2onnx (default), or jax2tf -> TensorFlow -> tf2onnx, the independent second "
                          "one, run in its own pinned venv (created on first use, 1.9 GB; see docs/convert.md)")
    exp.add_argument("--atol", type=float, help="fp32 parity tolerance in score units (default 1e-5)")
    exp.add_argument("--clips", type=Path, nargs="+",
                     help="real audio files for the parity gate (default: the shipped clips; none is an error)")
    exp.add_argument("--seed", type=int, default=0, help="seed of random parity inputs and of the demo checkpoint")
    exp.add_argument("--report", type=Path, help="also write the parity report(s) as JSON here")
    exp.add_argument("--input", choices=("mel", "audio"), default="mel",
                     help="model input: log-mel windows (mel), or 3 s audio chunks with the front end in the graph")
    exp.add_argument("--dft", choices=DFT_CHOICES, default=DEFAULT_DFT,
                     help=f"--input audio: how the front end computes the DFT (default {DEFAULT_DFT}, docs/convert.md)")
    add_variant_args(exp)

    qnt = sub.add_parser("quantize", help="exported fp32 model -> parity-checked int8 / fp16 variant(s)")
    qnt.add_argument("model", type=Path, help="an fp32 model written by `export`")
    qnt.add_argument("--checkpoint", type=Path, required=True, help="the checkpoint it was exported from")
    qnt.add_argument("--out", type=Path, help="output path (default: MODEL.<precision>.onnx beside the model)")
    qnt.add_argument("--clips", type=Path, nargs="+",
                     help="real audio files for the parity gate (default: the shipped clips; none is an error)")
    qnt.add_argument("--seed", type=int, default=0, help="seed of the random parity inputs")
    qnt.add_argument("--report", type=Path, help="also write the parity report(s) as JSON here")
    add_variant_args(qnt)
    qnt.set_defaults(quantize="int8")

    cross = sub.add_parser("crosscheck", help="export with both backends; compare them with each other and JAX")
    cross.add_argument("checkpoint", type=Path, help="original pickled checkpoint")
    cross.add_argument("--clips", type=Path, nargs="+",
                       help="real audio files to compare on (default: the shipped clips; none is an error)")
    cross.add_argument("--atol", type=float, help="largest difference allowed between any two (default: fp32's 1e-5)")
    cross.add_argument("--out-dir", type=Path, help="keep both exports here (default: a temporary folder)")
    cross.add_argument("--models", type=Path, nargs="+",
                       help="compare these already exported models instead of exporting")
    cross.add_argument("--seed", type=int, default=0, help="seed of the exports' random parity inputs")
    cross.add_argument("--report", type=Path, help="also write the comparison as JSON here")

    demo = sub.add_parser("demo-checkpoint", help="write a checkpoint in the original pickle format")
    demo.add_argument("out", type=Path)
    demo.add_argument("--preset", choices=tuple(PRESETS), default="production")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def add_variant_args(parser: argparse.ArgumentParser) -> None:
    """Options of the int8 / fp16 variants (convert.quantize)."""
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=VariantOptions.quantize,
                        help="variant written to --out: fp32 (none), int8 (CPU), fp16 (GPU), or auto: the CPU "
                             "recommendation at --out and the others beside it as MODEL.<precision>.onnx")
    parser.add_argument("--allow-partial", action="store_true",
                        help="with --quantize auto: write the variants that pass even if another fails (exit 0)")
    parser.add_argument("--int8-atol", type=float, help="int8 parity tolerance in score units (default 0.005)")
    parser.add_argument("--fp16-atol", type=float, help="fp16 parity tolerance in score units (default 0.005)")
    parser.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=VariantOptions.per_channel,
                        help="int8: one weight scale per output channel (default off: no gain measured)")
    parser.add_argument("--reduce-range", action=argparse.BooleanOptionalAction, default=VariantOptions.reduce_range,
                        help="int8: 7-bit weights (default on): x86 CPUs without VNNI (AVX2 only) saturate u8*s8 "
                             "products of full-range weights; --no-reduce-range only for VNNI/ARM servers, gated there")
    parser.add_argument("--int8-activations", choices=INT8_ACTIVATIONS, default=DEFAULT_INT8_ACTIVATIONS,
                        help="int8 activation scales: static (the default: one fixed scale per layer, calibrated on "
                             "real audio), row (one per row of each layer's input: 10-15%% slower) or batch "
                             "(onnxruntime's one per call: a window's scores then depend on its batch neighbours, "
                             "so corpus runs cannot fill calls across files); docs/corpus-speed.md")
    parser.add_argument("--calibration-clips", type=Path, nargs="+", metavar="AUDIO",
                        help="real piano recordings static int8 is calibrated on (default: convert/clips/calibration/; "
                             "keep them apart from the gate's --clips)")
    parser.add_argument("--optimize", action="store_true",
                        help="apply onnxruntime's transformer fusions (off by default: slower on CPU)")


def export_options(args: argparse.Namespace) -> ExportOptions:
    """The ExportOptions the `export` flags ask for."""
    return ExportOptions(opset=args.opset, backend=args.backend, atol=args.atol, clips=args.clips, seed=args.seed)


def variant_options(args: argparse.Namespace) -> VariantOptions:
    """The VariantOptions the variant flags (add_variant_args) ask for."""
    return VariantOptions(quantize=args.quantize, int8_atol=args.int8_atol, fp16_atol=args.fp16_atol,
                          per_channel=args.per_channel, reduce_range=args.reduce_range, optimize=args.optimize,
                          allow_partial=args.allow_partial, int8_activations=args.int8_activations,
                          calibration_clips=args.calibration_clips)


def cmd_export(args: argparse.Namespace) -> int:
    from convert.export import export
    from convert.parity import format_report

    if args.input == "audio":  # the same export, then the front end composed in front of each variant
        from convert.audio_export import export_audio

        export = partial(export_audio, dft=args.dft)
    try:
        result = export(args.checkpoint, args.out, export_options(args), variant_options(args))
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
        print(f"wrote {path} ({precision}, {path.stat().st_size / 1e6:.1f} MB)")
    print(f"export took {result.seconds:.1f} s")
    for precision in sorted(set(result.reports) - set(result.written) - {"fp32"}):
        print(f"not written: the {precision} variant failed its parity gate (report above)")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from convert.audio_export import refuse_audio_model
    from convert.parity import format_report
    from convert.variants import quantize_file

    refuse_audio_model(args.model)
    try:
        reports, written = quantize_file(args.model, args.checkpoint, args.out, variant_options(args),
                                         clips=args.clips, seed=args.seed)
    except ParityError as exc:
        if exc.report:
            print(format_report(exc.report), file=sys.stderr)
        raise
    for precision, report in reports.items():
        if precision != "fp32":
            print(format_report(report))
    if args.report:
        args.report.write_text(json.dumps(reports, indent=2))
    for precision, path in written.items():
        print(f"wrote {path} ({precision}, {path.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_crosscheck(args: argparse.Namespace) -> int:
    from convert.crosscheck import crosscheck, format_crosscheck

    report = crosscheck(args.checkpoint, args.clips, atol=args.atol, seed=args.seed, out_dir=args.out_dir,
                        models=args.models)
    print(format_crosscheck(report))
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


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
    commands = {"export": cmd_export, "quantize": cmd_quantize, "crosscheck": cmd_crosscheck,
                "demo-checkpoint": cmd_demo}
    try:
        return commands[args.command](args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
