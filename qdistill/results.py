"""What makes two result files comparable, and the per-query values a retention is computed from.

A student's retention divides its per-query values by the teacher's on the same queries. That is only a
retention when both were made alike: same corpus, queries and qrels (by content), same split, index kind and
teacher index, same k and score function. Queries the student trained on (leaked evaluation queries) are left
out of both sides and counted; every table and report takes its pairs from here.
"""

from __future__ import annotations

from qdistill.cli import UsageError

# the settings a result records in `made_alike`; two results pair only when all of them are equal
ALIKE = ("dataset", "split", "index", "teacher_index", "k_values", "similarity", "own_ids", "index_seed")
ALIKE_NAMES = {
    "dataset": "corpus, queries or qrels (content digest)",
    "split": "qrels split",
    "index": "index kind",
    "teacher_index": "teacher index",
    "k_values": "k values",
    "similarity": "score function",
    "own_ids": "queries whose own id is dropped",
    "index_seed": "index build seed",
}


def result_file(dataset: str, index: str) -> str:
    """The file name of a result: <dataset>.json for exact search, <dataset>.<index>.json for hnsw/ivfpq, so
    results over different index kinds never overwrite each other."""
    return f"{dataset}.json" if index == "flat" else f"{dataset}.{index}.json"


def made_alike(settings: dict) -> dict:
    """The comparable part of a result's settings."""
    return {k: settings.get(k) for k in ALIKE}


def differences(a: dict, b: dict) -> list[str]:
    """What differs between two results' `made_alike` records, in words ([] = comparable)."""
    if "made_alike" not in a or "made_alike" not in b:
        return ["an older result without its settings record"]
    x, y = a["made_alike"], b["made_alike"]
    return [f"{ALIKE_NAMES[k]}: {x.get(k)} vs {y.get(k)}" for k in ALIKE if x.get(k) != y.get(k)]


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
