"""PNG plots of a suite's series (matplotlib, headless)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(suite, series, path):
    """Writes `series` ({"kind": ..., "data": {panel: {line: points}}}) to `path`."""
    kind, data = series["kind"], series["data"]
    if kind in ("iops_vs_faults", "mbps_vs_faults"):
        data = {"": data}
    panels = list(data.items())
    # One colour per configuration across panels, in order of first appearance.
    names = list(dict.fromkeys(n for _, lines in panels for n in lines))
    colour = {n: f"C{i % 10}" for i, n in enumerate(names)}
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (panel, lines) in zip(axes[0], panels):
        for name, pts in lines.items():
            pts = sorted(pts)
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            if kind == "resident_over_time":
                ys = [y / (1 << 20) for y in ys]
            ax.plot(xs, ys, marker="o" if kind != "resident_over_time" else None, label=name, color=colour[name])
        if kind == "iops_vs_qd":
            ax.set_xscale("log", base=2)
            ax.set_xlabel("queue depth")
            ax.set_ylabel("IOPS (steady state)")
        elif kind == "resident_over_time":
            ax.set_xlabel("seconds")
            ax.set_ylabel("resident guest RAM (MiB)")
            ax.set_ylim(bottom=0)
        elif kind in ("iops_vs_faults", "mbps_vs_faults"):
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xlabel("device page faults per second (5 ms each)" if kind == "iops_vs_faults"
                          else "target device page faults per second (5 ms each)")
            ax.set_ylabel("IOPS" if kind == "iops_vs_faults" else "Mbit/s")
            ax.set_ylim(bottom=0)
        ax.set_title(f"{suite}: {panel}" if panel else suite)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
