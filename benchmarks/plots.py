"""PNG plots of a results document: warm latency per variant and batch, and the cold-start breakdown."""

from __future__ import annotations

from pathlib import Path

from benchmarks.results import COLD_PHASES


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the plots need matplotlib: install the 'bench' extra, or pass --no-plots") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_plot(results: dict, path: Path) -> None:
    """p50 latency per batch (bars) with p90 and p99 marks, and throughput, for every measured variant."""
    plt = _pyplot()
    measured = {n: v["warm"] for n, v in results["variants"].items() if v.get("warm")}
    batches = results["settings"]["batches"]
    fig, (ax_lat, ax_tp) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(measured), 1)
    for i, (name, warm) in enumerate(measured.items()):
        xs = [j + (i - (len(measured) - 1) / 2) * width for j in range(len(batches))]
        p50 = [warm[str(b)]["p50_s"] * 1e3 for b in batches]
        ax_lat.bar(xs, p50, width, label=name)
        ax_lat.scatter(xs, [warm[str(b)]["p90_s"] * 1e3 for b in batches], marker="_", color="k", s=60)
        ax_lat.scatter(xs, [warm[str(b)]["p99_s"] * 1e3 for b in batches], marker="x", color="k", s=15)
        ax_tp.bar(xs, [warm[str(b)]["chunks_per_s"] for b in batches], width, label=name)
    for ax, label in ((ax_lat, "latency, ms (bar p50, - p90, x p99; log)"), (ax_tp, "throughput, chunks/s")):
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    ax_lat.set_yscale("log")
    ax_tp.legend(fontsize=8)
    cpus = len(results["threads"]["cpus"])
    fig.suptitle(f"Warm latency, {results['settings']['runs']} runs per batch, {cpus} CPU thread(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cold_plot(results: dict, path: Path) -> None:
    """Stacked phases of each cold start, peak RSS written beside each bar."""
    plt = _pyplot()
    runs = []
    for name, rec in results["variants"].items():
        if "cold_first_run" in rec:
            runs.append((f"{name} (first run)", rec["cold_first_run"]))
        if "cold" in rec:
            runs.append((name, rec["cold"]))
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(runs) + 1.8))
    colors = dict(zip(COLD_PHASES, plt.get_cmap("tab10").colors, strict=False))
    labelled = set()
    for i, (_, cold) in enumerate(runs):
        left = 0.0
        for phase, seconds in cold["phases"].items():  # in the order they happened
            label = None if phase in labelled else phase.replace("_", " ")
            ax.barh(i, seconds, left=left, color=colors.get(phase, "grey"), label=label)
            labelled.add(phase)
            left += seconds
        ax.text(cold["total_s"], i, f"  {cold['total_s']:.1f} s, {cold['peak_rss_bytes'] / 1e6:.0f} MB RSS",
                va="center", fontsize=8)
    ax.set_yticks(range(len(runs)), [label for label, _ in runs])
    ax.invert_yaxis()
    ax.set_xlabel("seconds from process start to the 19 scores")
    ax.set_xlim(0, max((c["total_s"] for _, c in runs), default=1) * 1.35)
    ax.legend(fontsize=8, loc="lower right")
    runs_each = results["settings"].get("cold_runs", 1)
    ax.set_title("Cold start, one fresh process" if runs_each == 1 else
                 f"Cold start, the median of {runs_each} fresh processes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(results: dict, out: Path) -> list[Path]:
    paths = [out / "latency.png", out / "cold_start.png"]
    latency_plot(results, paths[0])
    cold_plot(results, paths[1])
    return paths
