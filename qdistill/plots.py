"""The plots of the reports: retention vs batch-1 latency with its Pareto front; agreement vs retention."""

from __future__ import annotations

from pathlib import Path


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of (latency, quality) points no other point beats on both (lower latency, higher quality)."""
    front = []
    for i, (lat, q) in enumerate(points):
        dominated = any(
            (lat2 <= lat and q2 >= q) and (lat2 < lat or q2 > q) for j, (lat2, q2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_quality_latency(labels, points, path, title="") -> list[int]:
    """Scatter of mean retention vs batch-1 latency with the Pareto front drawn; returns the front's indices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs, ys = zip(*points)
    ax.scatter(xs, ys, color="tab:blue", zorder=3)
    for label, (x, y) in zip(labels, points):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="tab:red", label="Pareto front")
    ax.set_xlabel("batch-1 query latency, ms (p50)")
    ax.set_ylabel("mean nDCG@10 retention")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return front


def plot_agreement(points, path, title="") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([p[1] for p in points], [p[0] for p in points], color="tab:blue")
    ax.set_xlabel("overlap@10 with the teacher's top-10 (no relevance labels)")
    ax.set_ylabel("nDCG@10 retention (relevance labels)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
