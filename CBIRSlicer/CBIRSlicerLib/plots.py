"""Figures for evaluation reports (PNG through matplotlib, imported only when a figure is drawn)."""

from __future__ import annotations


def precision_curve_png(curves: dict[str, dict], path: str, title: str = "modified precision@k") -> str:
    """Plot micro and macro modified P@k against k for one or more runs (name -> curve dict) and save a PNG."""
    import matplotlib.pyplot as plt

    figure = precision_figure(curves, title)
    figure.savefig(path)
    plt.close(figure)
    return path


def precision_figure(curves: dict[str, dict], title: str = "modified precision@k"):
    """The P@k figure (matplotlib): micro and macro curves per run, chance levels, whole-number k ticks."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and never a GUI backend inside Slicer
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.0, 3.4), dpi=120)
    for name, curve in curves.items():
        line = axes.plot(curve["k"], curve["micro"], marker="o", markersize=3, label=f"{name} micro")[0]
        axes.plot(curve["k"], curve["macro"], linestyle="--", color=line.get_color(), label=f"{name} macro")
        if curve.get("chance") is not None:
            axes.axhline(curve["chance"], color=line.get_color(), linestyle=":", linewidth=1, label=f"{name} chance")
    axes.set_xlabel("k")
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # k counts cases: no tick at 2.5
    axes.set_ylabel("modified precision@k")
    axes.set_ylim(0, 1.02)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    return figure
