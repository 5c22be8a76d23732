"""A corpus run's outputs: scores.csv, timeline.csv, and report.md with PNG plots (matplotlib, the `report` extra).

Every file is written atomically (a temporary file in the same folder, fsynced, then renamed over the old one).
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from runtime.constants import API_KEYS, DIMENSIONS

SCORES_CSV = "scores.csv"
TIMELINE_CSV = "timeline.csv"
REPORT_MD = "report.md"
TOP_N = 3  # files listed with the highest and the lowest score of each dimension
THRESHOLDS = (0.5, 0.7)  # the original app's colour thresholds


@dataclass
class CorpusSummary:
    """What a run did; ``failures`` lists (path, error) of every file that has no scores."""

    out_dir: Path
    files: int
    analysed: int
    from_journal: int
    audio_seconds: float  # of all files with scores
    analysed_seconds: float  # of the files analysed in this run
    wall_seconds: float
    failures: list[tuple[str, str]] = field(default_factory=list)
    plots: bool = False
    floor: object | None = None  # runtime.corpus.floor.Floor of a local run: the model at full batches + decoding
    cpu_seconds: float | None = None  # this process's CPU time during the run (a local run's work, whatever the load)

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def speed(self) -> float | None:
        """Audio hours per hour of this run's wall time (None if nothing was analysed)."""
        return self.analysed_seconds / self.wall_seconds if self.analysed and self.wall_seconds > 0 else None


def families() -> list[tuple[str, list[str]]]:
    """The dimension families (Timing, ..., Music Making, Emotion & Mood, ...) and their API keys, in model order.

    Derived from the labels: dimensions sharing a first word form a family named by their common word prefix.
    """
    groups: dict[str, list[tuple[list[str], str]]] = {}
    for label, key in DIMENSIONS:
        words = label.split("_")
        groups.setdefault(words[0], []).append((words, key))
    out = []
    for first, members in groups.items():
        prefix = [first]
        if len(members) > 1:
            common = os.path.commonprefix([words for words, _ in members])
            prefix = common or prefix
        out.append((" ".join(prefix), [key for _, key in members]))
    return out


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never a partial one."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _csv(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def scores_csv(entries: list[dict]) -> str:
    """One row per file: path, duration_seconds, the 19 scores, error (empty cells where there are none)."""
    rows = []
    for e in entries:
        res = e["result"] or {}
        scores = res.get("scores") or {}
        rows.append([e["path"], res.get("duration_seconds", ""), *(scores.get(k, "") for k in API_KEYS),
                     e["error"] or ""])
    return _csv(["path", "duration_seconds", *API_KEYS, "error"], rows)


def timeline_csv(entries: list[dict]) -> str:
    """One row per 3 s chunk of every scored file: path, chunk index, start_seconds, the 19 chunk scores."""
    rows = []
    for e in entries:
        for i, chunk in enumerate((e["result"] or {}).get("timeline") or []):
            rows.append([e["path"], i, chunk["start_seconds"], *(chunk["scores"][k] for k in API_KEYS)])
    return _csv(["path", "chunk", "start_seconds", *API_KEYS], rows)


def write_outputs(out: Path, entries: list[dict], summary: CorpusSummary, *, plots: bool = True) -> bool:
    """Write the CSVs, the plots (if asked for and matplotlib is installed) and report.md; True if plots were made."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / SCORES_CSV, scores_csv(entries))
    write_atomic(out / TIMELINE_CSV, timeline_csv(entries))
    scored = [e for e in entries if e["result"]]
    made, skipped = {}, None if plots else "plots skipped: not asked for"
    try:
        made = plot_families(out, scored) if plots and scored else {}
    except ImportError:
        skipped = "plots skipped: matplotlib is not installed (pip install 'percepiano-onnx[report]')"
    write_atomic(out / REPORT_MD, report_markdown(scored, summary, made, skipped) + endpoints_markdown(entries))
    return skipped is None


def plot_families(out: Path, scored: list[dict]) -> dict[str, str]:
    """One PNG per family: the distribution of each of its dimensions across the corpus; {family: file name}."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("the corpus report's plots need matplotlib: pip install 'percepiano-onnx[report]'") from exc
    made = {}
    for family, keys in families():
        values = [[e["result"]["scores"][k] for e in scored] for k in keys]
        fig, ax = plt.subplots(figsize=(7, 0.6 + 0.55 * len(keys)))
        ax.boxplot(values, orientation="horizontal", widths=0.5, showfliers=False)
        for i, vals in enumerate(values, 1):
            ax.plot(vals, [i] * len(vals), "o", alpha=0.45, markersize=3, color="tab:blue")
        for t in THRESHOLDS:
            ax.axvline(t, color="grey", linestyle=":", linewidth=1)
        ax.set_yticks(range(1, len(keys) + 1), keys, fontsize=8)
        ax.set_xlim(0, 1)
        ax.invert_yaxis()  # model order, top to bottom
        ax.set_xlabel(f"score ({len(scored)} files)")
        ax.set_title(family)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        name = "dist_" + "_".join(family.lower().replace("&", " ").split()) + ".png"
        write_atomic(out / name, buf.getvalue())
        made[family] = name
    return made


def report_markdown(scored: list[dict], summary: CorpusSummary, plots: dict[str, str], skipped: str | None) -> str:
    """report.md: the summary, failures with their reasons, then per family its plot and its extreme files."""
    hours = summary.audio_seconds / 3600
    lines = ["# Corpus report", "",
             f"{summary.files} files, {len(scored)} scored ({hours:.3f} h of audio), {summary.failed} failed. "
             f"This run analysed {summary.analysed} and took {summary.from_journal} from the journal.", ""]
    models = ", ".join(sorted({str(e.get("model")) for e in scored})) or "none"
    caps = sorted({e.get("cap_seconds") for e in scored}, key=lambda c: (c is not None, c or 0))
    cap = ", ".join("whole files" if c is None else f"the first {c:g} s of each file" for c in caps) or "-"
    lines += [f"Model: {models}. Analysed: {cap}.", ""]
    if summary.speed:
        lines += [f"Speed of this run: {summary.speed:.1f} audio hours per hour ({summary.wall_seconds:.1f} s).", ""]
        if summary.floor:
            f = summary.floor
            lines[-1:-1] = [f"This machine's floor, measured in the same run: {f.audio_hours_per_hour:.1f} audio hours "
                            f"per hour ({f.windows} windows at {f.model_ms_per_window:.1f} ms each in calls of "
                            f"{f.batch_size}, plus {f.prepare_seconds:.1f} s of decoding and features): the run "
                            f"went at {summary.speed / f.audio_hours_per_hour:.2f} of it."]
    if skipped:
        lines += [f"*{skipped}*", ""]
    if summary.failures:
        lines += [f"## Failed files ({summary.failed})", "", "| file | why |", "|---|---|"]
        lines += [f"| {_cell(p)} | {_cell(err.removeprefix(p + ': '))} |" for p, err in summary.failures] + [""]
    if not scored:
        return "\n".join(lines + ["No file was scored."]) + "\n"
    lines += ["Each dimension's highest and lowest files; scores in [0, 1], the original app coloured "
              f"them at {THRESHOLDS[0]} and {THRESHOLDS[1]}.", ""]
    top = max(1, min(TOP_N, len(scored) // 2))  # a small corpus: the two lists do not overlap
    for family, keys in families():
        lines += [f"## {family}", ""]
        if family in plots:
            lines += [f"![{family}]({plots[family]})", ""]
        lines += ["| dimension | mean | highest | lowest |", "|---|---|---|---|"]
        for key in keys:
            ranked = sorted(scored, key=lambda e, k=key: (-e["result"]["scores"][k], e["path"]))
            mean = sum(e["result"]["scores"][key] for e in scored) / len(scored)
            lines.append(f"| {key} | {mean:.3f} | {_extremes(ranked[:top], key)} | "
                         f"{_extremes(ranked[::-1][:top], key)} |")
        lines.append("")
    return "\n".join(lines)


def endpoints_markdown(entries: list[dict]) -> str:
    """For a run through a service (--url): which endpoint scored (or refused) which file; '' for a local run."""
    if not any(e.get("endpoint") for e in entries):
        return ""
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.get("endpoint") or "none"] = counts.get(e.get("endpoint") or "none", 0) + 1
    lines = ["", "## Endpoints", "", "| endpoint | files |", "|---|---|"]
    lines += [f"| {_cell(url)} | {n} |" for url, n in counts.items()]
    lines += ["", "| file | endpoint |", "|---|---|"]
    lines += [f"| {_cell(e['path'])} | {_cell(e.get('endpoint') or 'none (no answer)')} |" for e in entries]
    return "\n".join(lines) + "\n"


def _extremes(entries: list[dict], key: str) -> str:
    return "<br>".join(f"{e['result']['scores'][key]:.3f} {_cell(Path(e['path']).name)}" for e in entries)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")
