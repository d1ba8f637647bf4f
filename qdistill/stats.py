"""Error bars and significance for retention, from per-query values (scipy.stats; no hand-written resampling).

Retention on one dataset = mean student nDCG@10 / mean teacher nDCG@10 over its queries. Its 95% interval is a
paired percentile bootstrap over queries (`scipy.stats.bootstrap(..., paired=True)`: a query's student and teacher
values are resampled together). The mean of per-dataset retentions gets a stratified bootstrap: each dataset's
queries are resampled within that dataset (`bootstrap` resamples each sample of `data` independently). Each
student-vs-teacher comparison gets a two-sided paired t-test over queries (`scipy.stats.ttest_rel`, the test
ranx's `compare` uses by default).
"""

from __future__ import annotations

import numpy as np

N_RESAMPLES = 2000
CONFIDENCE = 0.95


def _interval(data, statistic, seed: int, **options) -> tuple[float, float]:
    """(low, high): scipy's percentile bootstrap at CONFIDENCE, seeded."""
    from scipy import stats

    res = stats.bootstrap(
        data,
        statistic,
        n_resamples=N_RESAMPLES,
        confidence_level=CONFIDENCE,
        method="percentile",
        rng=np.random.default_rng(seed),
        **options,
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_arrays(student: dict, teacher: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per-query values of the queries both have, in one order."""
    qids = sorted(set(student) & set(teacher))
    return np.array([student[q] for q in qids], float), np.array([teacher[q] for q in qids], float)


def _ratio(s, t, axis=-1):
    t_mean = np.mean(t, axis=axis)
    return np.mean(s, axis=axis) / np.where(t_mean == 0, np.nan, t_mean)


def retention_ci(student: dict, teacher: dict, seed: int = 0) -> dict:
    """{'value', 'low', 'high', 'p_value', 'queries'} for one dataset's retention, from per-query values."""
    from scipy import stats

    s, t = paired_arrays(student, teacher)
    out = {"value": float(_ratio(s, t)), "low": None, "high": None, "p_value": None, "queries": len(s)}
    if len(s) < 2 or not t.any():
        return out
    out["low"], out["high"] = _interval((s, t), _ratio, seed, paired=True, vectorized=True)
    out["p_value"] = float(stats.ttest_rel(s, t).pvalue) if np.any(s != t) else 1.0
    return out


def mean_retention_ci(pairs: list[tuple[dict, dict]], seed: int = 0) -> dict:
    """{'value', 'low', 'high', 'datasets'} for the mean over datasets of retention, each dataset's queries
    resampled within it."""

    arrays = [paired_arrays(s, t) for s, t in pairs]
    arrays = [(s, t) for s, t in arrays if len(s) and t.any()]
    value = float(np.mean([_ratio(s, t) for s, t in arrays])) if arrays else None
    out = {"value": value, "low": None, "high": None, "datasets": len(arrays)}
    if not arrays or min(len(s) for s, _ in arrays) < 2:
        return out

    def statistic(*indices):  # one resampled index array per dataset
        return np.mean([_ratio(s[i], t[i]) for (s, t), i in zip(arrays, indices)])

    indices = tuple(np.arange(len(s)) for s, _ in arrays)
    out["low"], out["high"] = _interval(indices, statistic, seed, vectorized=False)
    return out


def mean_ci(values, seed: int = 0) -> dict:
    """{'value', 'low', 'high', 'n'}: a mean over queries with its percentile bootstrap interval."""

    x = np.asarray(list(values), float)
    out = {"value": float(x.mean()) if len(x) else None, "low": None, "high": None, "n": len(x)}
    if len(x) >= 2 and np.ptp(x) > 0:
        out["low"], out["high"] = _interval((x,), np.mean, seed, vectorized=True)
    elif len(x):
        out.update(low=out["value"], high=out["value"])
    return out


def fmt_ci(ci: dict | None, digits: int = 3) -> str:
    """'0.953 [0.931, 0.970]', or the value alone when no interval exists, or '-'."""
    if not ci or ci.get("value") is None:
        return "-"
    if ci.get("low") is None:
        return f"{ci['value']:.{digits}f}"
    bound = max(2, digits - 1)
    return f"{ci['value']:.{digits}f} [{ci['low']:.{bound}f}, {ci['high']:.{bound}f}]"
