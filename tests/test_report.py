"""report.py: the Pareto front and the plot on a small hand-made results set."""

from qdistill import plots


def test_pareto_front_by_hand():
    # (latency ms, retention): b dominates c (faster and better); d is slowest but best; e duplicates nothing
    points = [(70.0, 1.0), (16.0, 0.93), (17.0, 0.90), (9.0, 0.80), (30.0, 0.92)]
    assert plots.pareto_front(points) == [3, 1, 0]


def test_plot_written(tmp_path):
    points = [(70.0, 1.0), (16.0, 0.93), (17.0, 0.90), (9.0, 0.80)]
    path = tmp_path / "plot.png"
    front = plots.plot_quality_latency(["teacher", "[0,11]", "[0,10]", "[11]"], points, path, "test")
    assert front == [3, 1, 0]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
