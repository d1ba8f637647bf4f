"""qdistill.search, metrics, stats: exact search, metrics by hand, intervals by hand."""

import numpy as np
import pytest

from qdistill import evaluation, metrics, search, stats


def test_search_keeps_k_hits_after_dropping_the_querys_own_id():
    docs = search.unit(np.random.default_rng(0).normal(size=(12, 8)))
    doc_ids = [f"x{i}" for i in range(12)]
    ranked = np.argsort(-(docs @ docs[0]))
    assert ranked[0] == 0  # the query is document x0 itself
    relevant = doc_ids[ranked[10]]  # 10th hit once x0 is dropped
    flat = search.build_faiss(docs, "flat")
    results = evaluation.retrieve(lambda q, k: search.search(flat, q, k), docs[[0]], ["x0"], doc_ids, 10)
    assert metrics.evaluate({"x0": {relevant: 1}}, results, [10], own={"x0"})[0]["Recall@10"] == 1.0


def test_retention_intervals_contain_the_value_narrow_with_queries_and_test_pairs():
    rng = np.random.default_rng(0)
    t = {f"q{i}": v for i, v in enumerate(rng.uniform(0.2, 1.0, 400))}
    half = {q: 0.5 * v for q, v in t.items()}
    ci = stats.retention_ci(half, t)
    assert ci["value"] == pytest.approx(0.5) and ci["low"] == pytest.approx(0.5) and ci["high"] == pytest.approx(0.5)
    assert ci["p_value"] < 1e-10
    noisy = {q: float(np.clip(v + rng.normal(0, 0.3), 0, 1)) for q, v in t.items()}
    wide = stats.retention_ci(dict(list(noisy.items())[:40]), dict(list(t.items())[:40]))
    narrow = stats.retention_ci(noisy, t)
    assert wide["low"] < wide["value"] < wide["high"] and narrow["low"] < narrow["value"] < narrow["high"]
    assert narrow["high"] - narrow["low"] < wide["high"] - wide["low"]
    both = stats.mean_retention_ci([(half, t), (noisy, t)])
    assert both["value"] == pytest.approx((0.5 + narrow["value"]) / 2) and both["low"] < both["value"] < both["high"]
    assert stats.fmt_ci(both).startswith(f"{both['value']:.3f} [")


def test_the_stratified_interval_of_the_mean_retention_equals_a_hand_written_one():
    """Each dataset's queries resampled within it, by hand with numpy: the same 95% interval to two decimals."""
    rng = np.random.default_rng(3)
    pairs, arrays = [], []
    for n, scale in ((30, 0.9), (200, 0.7), (60, 1.0)):
        t = rng.uniform(0.1, 1.0, n)
        s = np.clip(scale * t + rng.normal(0, 0.15, n), 0, 1)
        pairs.append(({f"q{i}": v for i, v in enumerate(s)}, {f"q{i}": v for i, v in enumerate(t)}))
        arrays.append((s, t))
    ci = stats.mean_retention_ci(pairs, seed=0)
    draws = []
    for _ in range(4000):
        ratios = []
        for s, t in arrays:
            i = rng.integers(0, len(s), len(s))
            ratios.append(s[i].mean() / t[i].mean())
        draws.append(np.mean(ratios))
    low, high = np.percentile(draws, [2.5, 97.5])
    assert ci["value"] == pytest.approx(np.mean([s.mean() / t.mean() for s, t in arrays]))
    assert ci["low"] == pytest.approx(low, abs=0.01) and ci["high"] == pytest.approx(high, abs=0.01), (ci, low, high)
    assert high - low > 0.03, "a real interval, not a point"
