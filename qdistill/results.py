"""What makes two result files comparable, and the per-query values a retention is computed from.

A student's retention divides its per-query values by the teacher's on the same queries. That is only a
retention when both were made alike: same corpus, queries and qrels (by content), same split, index kind,
teacher index and its search settings, same score function (evaluation.result_settings). Queries the student
trained on (leaked evaluation queries) are left out of both sides and counted; every table and report takes its
pairs from here.
"""

from __future__ import annotations

from qdistill.cli import UsageError

# A result's settings (evaluation.result_settings) are the one definition of what made it: all of them key the
# result file, and all but these make two results comparable. The k values only say which cut-offs a result lists
# (paired() checks that the metric is in both); the schema is the file's layout. Everything else (data, split,
# index kind and content, its served settings, the second search's depth, score function, own ids, seeds, the
# faiss version) must be equal.
LISTED_ONLY = ("k_values", "schema")
NAMES = {
    "dataset": "corpus, queries or qrels (content digest)",
    "split": "qrels split",
    "index": "index kind",
    "teacher_index": "teacher index",
    "index_verified": "index check",
    "similarity": "score function",
    "own_ids": "queries whose own id is dropped",
    "index_seed": "index build seed",
    "index_build": "index build settings",
    "served": "the index's search settings",
    "deep_search_k": "depth of the deep search",
    "faiss": "faiss version",
}


def result_file(dataset: str, index: str, dim: int | None = None) -> str:
    """The file name of a result: <dataset>.json for exact search, <dataset>.<index>.json for approximate ones
    (hnsw/ivfpq built here, given-<type> for a given approximate index), <dataset>[.<index>].d<dim>.json at a
    Matryoshka truncation, so results over different index kinds or dimensions never overwrite each other."""
    name = dataset if index == "flat" else f"{dataset}.{index}"
    return f"{name}.d{dim}.json" if dim else f"{name}.json"


def made_alike(settings: dict) -> dict:
    """The comparable part of a result's settings: all of them but what only lists cut-offs or file layout."""
    return {k: v for k, v in settings.items() if k not in LISTED_ONLY}


def differences(a: dict, b: dict) -> list[str]:
    """What differs between two results' `made_alike` records, in words ([] = comparable)."""
    if "made_alike" not in a or "made_alike" not in b:
        return ["an older result without its settings record"]
    x, y = a["made_alike"], b["made_alike"]
    return [f"{NAMES.get(k, k)}: {x.get(k)} vs {y.get(k)}" for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]


def check_alike(student: dict, teacher: dict, where: str) -> None:
    """One error line when a student's result and the teacher's were not made alike."""
    diff = differences(student, teacher)
    if diff:
        raise UsageError(
            f"{where}: the student's and the teacher's results were not made alike ({'; '.join(diff)}); "
            "rerun evaluate_retrieval.py with both models in one call (--overwrite)"
        )


def kind(record: dict) -> str:
    """'in-domain' or 'zero-shot': whether the student trained on this collection (documents or its queries)."""
    return "in-domain" if record.get("in_domain_text") else "zero-shot"


def paired(student: dict, teacher: dict, metric: str = "NDCG@10") -> tuple[dict, dict]:
    """(student, teacher) per-query values of one metric over the same queries, the student's leaked
    evaluation queries left out of both: the one way into a retention, so results not made alike (check_alike)
    and different query sets are errors here, never silently intersected."""
    check_alike(student, teacher, f"{student.get('model')} on {student.get('dataset')}")
    if metric not in student.get("per_query", {}) or metric not in teacher.get("per_query", {}):
        raise UsageError(
            f"{student.get('model')} on {student.get('dataset')}: {metric} is not in both results (other "
            "--k_values?); rerun evaluate_retrieval.py with the k values you need"
        )
    s, t = student["per_query"][metric], teacher["per_query"][metric]
    if set(s) != set(t):
        raise UsageError(
            f"the student's and the teacher's {metric} cover different queries ({len(s)} vs {len(t)}); "
            "rerun evaluate_retrieval.py with both models in one call (--overwrite)"
        )
    leaked = set(student.get("leaked_query_ids", []))
    return {q: v for q, v in s.items() if q not in leaked}, {q: v for q, v in t.items() if q not in leaked}


def clean_ratio(student: dict, teacher: dict, metric: str = "NDCG@10") -> float | None:
    """Mean student value / mean teacher value over the queries the student never trained on."""
    s, t = paired(student, teacher, metric)
    t_mean = sum(t.values()) / len(t) if t else 0.0
    return (sum(s.values()) / len(s)) / t_mean if t_mean else None
