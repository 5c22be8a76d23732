"""`python -m runtime analyze | info | serve`: the runtime's command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from runtime.constants import API_KEYS, ORIGINAL_CAP_SECONDS
from runtime.errors import AudioError, ConfigError, InputError, ModelError
from runtime.model import DEVICES
from runtime.self_check import ALLOW_ENV, ALLOW_FLAG, require_passed

DEFAULT_MODEL = Path("artifacts/model.onnx")
USER_ERRORS = (AudioError, ConfigError, InputError, ModelError)
SKIP_HELP = (f"use the model even if its self-check fails on this device (its scores may then be wrong; "
             f"{ALLOW_ENV}=1 for the service)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the runtime does")
    sub = parser.add_subparsers(dest="command", required=True)

    an = sub.add_parser("analyze", help="score audio files (or, with --out, whole folders) on the 19 dimensions")
    an.add_argument("files", nargs="+", type=Path, metavar="FILE_OR_DIR")
    an.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"ONNX model (default {DEFAULT_MODEL})")
    an.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    an.add_argument("--batch-size", type=int, default=16, help="chunks per inference batch (default 16)")
    an.add_argument("--device", choices=DEVICES, default="auto")
    an.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    an.add_argument("--cap-seconds", type=float, nargs="?", const=ORIGINAL_CAP_SECONDS, metavar="N",
                    help=f"the cap: analyse only the first N s, cut after resampling as the original did "
                         f"(bare flag: {ORIGINAL_CAP_SECONDS:.0f} s); longer files are not refused")
    an.add_argument("--max-seconds", type=float, nargs="?", const=ORIGINAL_CAP_SECONDS, metavar="N",
                    dest="deprecated_max_seconds", help="deprecated alias of --cap-seconds (the original's name)")
    an.add_argument("--refuse-over", type=float, metavar="SECONDS",
                    help="refuse (per-file error) audio longer than this (default: only the 1 h hard limit)")
    an.add_argument("--out", type=Path, metavar="REPORT_DIR",
                    help="analyse a corpus: journal, scores.csv, timeline.csv and report.md in REPORT_DIR (resumable)")
    an.add_argument("--recursive", action="store_true", help="with --out: include files in subfolders")
    an.add_argument("--per-file", action="store_true",
                    help="with --out: run each file's windows in its own model calls (default: calls filled across "
                         "files whenever the model's scores do not depend on their batch neighbours)")
    an.add_argument("--modal", action="store_true", help=argparse.SUPPRESS)  # moved: python -m deploy analyze
    an.add_argument(ALLOW_FLAG, action="store_true", help=SKIP_HELP)

    info = sub.add_parser("info", help="print an exported model's metadata")
    info.add_argument("model", type=Path)
    info.add_argument("--json", action="store_true", help="the whole metadata document as JSON")
    info.add_argument("--device", choices=DEVICES, default="cpu", help="the session to open (default cpu)")

    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", choices=DEVICES, default="auto")
    serve.add_argument("--threads", type=int)
    serve.add_argument(ALLOW_FLAG, action="store_true", help=SKIP_HELP)
    return parser


def warn_about(model, path: Path) -> None:
    """One line on stderr for a demo model, whose scores mean nothing."""
    if model.info.demo:
        print(f"warning: {path} is a DEMO model (exported from a demo checkpoint with random weights): "
              "its scores mean nothing", file=sys.stderr)


def load_checked(args: argparse.Namespace):
    """The Analyzer of `analyze`: loaded, demo warning printed, self-check run (a failed one refuses the model)."""
    from runtime.analyze import Analyzer

    analyzer = Analyzer.from_path(args.model, device=args.device, threads=args.threads,
                                  batch_size=args.batch_size, cap_seconds=args.cap_seconds,
                                  refuse_over_seconds=args.refuse_over)
    warn_about(analyzer.model, args.model)
    require_passed(analyzer.model.run_self_check(), allow_failed=args.skip_self_check)
    return analyzer


def analyze_files(analyzer, files: list[Path], progress: bool) -> list[dict]:
    """Analyze each file; a failure becomes that file's `error` and the others still run."""
    results = []
    track = _progress(files, progress)
    for path in track:
        try:
            res = analyzer.analyze_file(path)
            results.append({"file": str(path), **res.to_dict(), "error": None})
        except (AudioError, InputError) as exc:
            results.append({"file": str(path), "duration_seconds": None, "scores": None, "timeline": None,
                            "error": str(exc)})
    return results


def _progress(items: list, enabled: bool):
    if not enabled:
        return items
    try:
        from rich.progress import track
    except ImportError:
        return items
    return track(items, description="analyzing", console=_stderr_console(), transient=True)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def print_tables(results: list[dict]) -> None:
    """One readable block per file: the 19 scores, 3 decimals, as the original app showed them."""
    for res in results:
        if res["error"]:
            print(f"{res['file']}: ERROR {res['error']}")
            continue
        print(f"{res['file']}  ({res['duration_seconds']:.1f} s, {len(res['timeline'])} chunks)")
        for key in API_KEYS:
            score = res["scores"][key]
            print(f"  {key:42s} {score:6.3f}  {'#' * round(score * 20)}")


def cmd_corpus(args: argparse.Namespace) -> int:
    """`analyze DIR ... --out REPORT_DIR`: the corpus run of runtime.corpus.runner."""
    from runtime.corpus.runner import analyze_corpus, summary_lines

    if args.modal:
        raise ConfigError("--modal moved to the deploy package: python -m deploy analyze DIR --out REPORT_DIR")
    if args.out is None or args.json:
        raise ConfigError("--recursive needs --out REPORT_DIR (and --out does not take --json)")
    try:
        analyzer = load_checked(args)  # demo warning and self-check, as for single files
        summary = analyze_corpus(args.files, args.out, model=args.model, recursive=args.recursive,
                                 cap_seconds=args.cap_seconds, batch_size=args.batch_size,
                                 device=args.device, threads=args.threads, progress=sys.stderr.isatty(),
                                 analyzer=analyzer, across_files=False if args.per_file else None)
    except KeyboardInterrupt:
        print(f"interrupted: finished files are in {args.out}/journal.jsonl; run again to resume", file=sys.stderr)
        return 130
    print("\n".join(summary_lines(summary)))
    return 1 if summary.failed else 0


def cmd_analyze(args: argparse.Namespace) -> int:
    if args.out is not None or args.recursive or args.modal:
        return cmd_corpus(args)
    analyzer = load_checked(args)
    results = analyze_files(analyzer, args.files, progress=len(args.files) > 1 and sys.stderr.isatty())
    if args.json:
        model = {**analyzer.model.info.summary(), "device": analyzer.model.device,
                 "self_check": analyzer.model.self_check.to_dict(), "demo": analyzer.model.info.demo}
        print(json.dumps({"model": model, "results": results}, indent=2))
    else:
        print_tables(results)
    failed = sum(1 for r in results if r["error"])
    if failed:
        print(f"{failed} of {len(results)} file(s) failed", file=sys.stderr)
    return 1 if failed else 0


def cmd_info(args: argparse.Namespace) -> int:
    import onnxruntime

    from runtime.model import OnnxModel

    model = OnnxModel(args.model, device=args.device)
    info = model.info
    warn_about(model, args.model)
    if args.json:
        session = {"demo": info.demo, "providers": model.providers, "onnxruntime": onnxruntime.__version__}
        print(json.dumps({**info.raw, "runtime": session}, indent=2))
        return 0
    parity = info.parity or {}
    print(f"model       {args.model} ({args.model.stat().st_size / 1e6:.1f} MB)")
    print(f"version     {info.version}")
    print(f"precision   {info.precision}")
    print(f"source      {info.source.get('filename')} sha256 {info.sha256}")
    print(f"config      {info.model_config}")
    print(f"parity      {'passed' if parity.get('passed') else 'not recorded'}; max abs {parity.get('max_abs')}; "
          f"tolerance {parity.get('tolerance')}")
    if info.variants:
        v = info.variants
        gates = ", ".join(f"{p} {'passed' if g['passed'] else 'FAILED'} (max abs {g['max_abs']:.1e})"
                          for p, g in v.get("gates", {}).items())
        print(f"variants    files {v.get('files')}; recommended {v.get('recommended', '-')}; gates: {gates}")
    print(f"versions    {info.versions}")
    print(f"session     {model.providers} (onnxruntime {onnxruntime.__version__})")
    check = info.raw.get("self_check") or {}
    stored = f"{len(check.get('scores', []))} stored windows, atol {check.get('atol')}" if check else "absent"
    print(f"self-check  {stored} (run at load by analyze and serve)")
    print(f"dimensions  {len(info.dimensions)}: " + ", ".join(info.api_keys))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from runtime.analyze import Analyzer
    from runtime.serve.app import Settings, serve, warm_up

    settings = Settings.from_env()
    analyzer = Analyzer.from_path(args.model, device=args.device, threads=args.threads,
                                  refuse_over_seconds=settings.refuse_over_seconds)
    warn_about(analyzer.model, args.model)
    warm_up(analyzer, allow_failed_self_check=args.skip_self_check or settings.allow_failed_self_check)
    serve(analyzer, host=args.host, port=args.port, settings=settings)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line, the deprecated spellings folded into their current names."""
    args = build_parser().parse_args(argv)
    if getattr(args, "deprecated_max_seconds", None) is not None:
        if args.cap_seconds is not None:
            raise ConfigError("--max-seconds is the deprecated name of --cap-seconds: give only --cap-seconds")
        print("warning: --max-seconds is deprecated, use --cap-seconds (the same cap)", file=sys.stderr)
        args.cap_seconds = args.deprecated_max_seconds
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    commands = {"analyze": cmd_analyze, "info": cmd_info, "serve": cmd_serve}
    try:
        return commands[args.command](args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

