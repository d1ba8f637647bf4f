"""Scoring one model's search results: relevance metrics (beir, pytrec_eval) and agreement with the teacher.

Relevance metrics need qrels; agreement needs only the teacher's own results on the same queries, so it answers
"does the student return what my teacher returns?" on a collection with no relevance labels.
"""

from __future__ import annotations

import copy

import numpy as np

from qdistill import stats
from qdistill.search import cosine_rows

AGREEMENT = ("overlap@10", "top1_in_top10", "query_cosine")


def drop_own_ids(qrels, results, own=frozenset()) -> tuple[dict, int]:
    """(results without each query's own id, how many were dropped), for the queries in `own` only: those whose
    document of the same id is the query itself (ArguAna, Quora: own_ids in evaluate_retrieval.py). Elsewhere an
    equal id is a coincidence and the document stays. A judged-relevant own document stays too (Cranfield's
    query 225 has document 225 relevant): beir's ignore_identical_ids would drop that one as well."""
    out, dropped = {}, 0
    for qid, docs in results.items():
        if qid in own and qid in docs and (qrels or {}).get(qid, {}).get(qid, 0) <= 0:
            docs, dropped = {d: s for d, s in docs.items() if d != qid}, dropped + 1
        out[qid] = docs
    return out, dropped


def evaluate(qrels, results, k_values, own=frozenset()) -> tuple[dict[str, float], int]:
    """(metrics, identical ids dropped): every metric, MRR@10 included, on the results with own ids dropped."""
    from beir.retrieval.evaluation import EvaluateRetrieval

    results, dropped = drop_own_ids(qrels, results, own)
    # evaluate() mutates `results`: hand it copies
    ndcg, _map, recall, precision = EvaluateRetrieval.evaluate(
        qrels, copy.deepcopy(results), k_values, ignore_identical_ids=False
    )
    mrr = EvaluateRetrieval.evaluate_custom(qrels, copy.deepcopy(results), [10], metric="mrr")
    return {**ndcg, **_map, **recall, **precision, **mrr}, dropped


def per_query(qrels, results, k_values, own=frozenset()) -> dict[str, dict[str, float]]:
    """{metric: {query id: value}} for NDCG@k, Recall@k and MRR@10 (pytrec_eval, as beir's averages use), on the
    results with own ids dropped: the values behind the error bars."""
    import pytrec_eval

    results, _ = drop_own_ids(qrels, results, own)
    ks = ",".join(map(str, k_values))
    scores = pytrec_eval.RelevanceEvaluator(qrels, {f"ndcg_cut.{ks}", f"recall.{ks}"}).evaluate(results)
    out = {
        f"{name}@{k}": {q: v[f"{m}_{k}"] for q, v in scores.items()}
        for name, m in (("NDCG", "ndcg_cut"), ("Recall", "recall"))
        for k in k_values
    }
    top10 = {q: dict(sorted(d.items(), key=lambda x: -x[1])[:10]) for q, d in results.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    out["MRR@10"] = {q: v["recip_rank"] for q, v in rr.items()}
    return out


def top_ids(results: dict, k: int) -> dict[str, list[str]]:
    return {q: [d for d, _ in sorted(docs.items(), key=lambda x: -x[1])[:k]] for q, docs in results.items()}


def agreement(student_top: dict, teacher_top: dict, student_emb, teacher_emb, q_ids, seed=0) -> dict:
    """Agreement of a student with the teacher on the same queries and index, each with a 95% interval:
    overlap@10 (shared ids in the two top-10s / the teacher's top-10 size: 10 unless the index is smaller), the
    share of queries whose teacher top-1 is in the student's top-10, and the mean cosine of the student's query
    embedding to the teacher's."""
    overlap = [
        len(set(student_top[q][:10]) & set(teacher_top[q][:10])) / max(1, len(teacher_top[q][:10])) for q in q_ids
    ]
    top1 = [float(bool(teacher_top[q]) and teacher_top[q][0] in student_top[q][:10]) for q in q_ids]
    cos = cosine_rows(np.asarray(student_emb), np.asarray(teacher_emb)).tolist()
    values = dict(zip(AGREEMENT, (overlap, top1, cos)))
    return {
        "summary": {name: stats.mean_ci(v, seed) for name, v in values.items()},
        "per_query": {name: dict(zip(q_ids, map(float, v))) for name, v in values.items()},
    }


def overlap_at_k(exact_rows, approx_rows, k) -> float:
    """Recall@k of an approximate index against exact search: shared top-k ids / k, averaged over queries."""
    hits = [len(set(e[:k]) & set(a[:k])) / min(k, len(e)) for e, a in zip(exact_rows, approx_rows)]
    return float(np.mean(hits))
