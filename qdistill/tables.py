"""The markdown tables of an evaluation: labelled datasets (nDCG@10, retention with intervals, zero-shot and
in-domain apart) and label-free ones (agreement with the teacher), and grouped datasets' means."""

from __future__ import annotations

import numpy as np

from qdistill import metrics, results, stats


def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def retention_cis(rows: list[dict], teacher: str, seed: int) -> None:
    """Per-dataset retention of nDCG@10 and R@100 with its interval and paired test, into each student row (in
    place), over the queries it never trained on, from results checked to be made alike (results.paired)."""
    by = {(r["model"], r["dataset"]): r for r in rows}
    for r in rows:
        t = by.get((teacher, r["dataset"]))
        if r["model"] == teacher or not t or "per_query" not in r or "metrics" not in r:
            continue
        r["retention"] = {
            m: stats.retention_ci(*results.paired(r, t, m), seed)
            for m in ("NDCG@10", "Recall@100")
            if m in t["metrics"]
        }


def results_table(rows: list[dict], datasets: list[str], teacher: str, seed: int = 0) -> str:
    """Markdown of the labelled datasets: rows = models, columns = nDCG@10 per dataset (retention [95% interval];
    * = the student trained on that collection's documents or queries), then per kind (zero-shot, in-domain;
    never mixed) the mean retention of nDCG@10 and R@100 and the mean overlap@10 with the teacher."""
    by = {(r["model"], r["dataset"]): r for r in rows}
    kinds = ("zero-shot", "in-domain")
    head = [
        "model",
        *[f"{d} nDCG@10 (ret.)" for d in datasets],
        *[f"{k} ret. {m}" for m in ("nDCG@10", "R@100") for k in kinds],
        *[f"{k} overlap@10" for k in kinds],
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    leaked = 0
    for m in dict.fromkeys(r["model"] for r in rows):
        cells, pairs, overlaps = [m + (" (teacher)" if m == teacher else "")], {}, {}
        for d in datasets:
            r, t = by.get((m, d)), by.get((teacher, d))
            if r is None:
                cells.append("-")
                continue
            kind = results.kind(r)
            leaked += r.get("leaked_queries", 0)
            if r.get("agreement"):
                overlaps.setdefault(kind, []).append(r["agreement"]["overlap@10"]["value"])
            for x, k in (("n", "NDCG@10"), ("r", "Recall@100")):
                if m != teacher and t and "per_query" in r and "per_query" in t and k in t["metrics"]:
                    pairs.setdefault((kind, x), []).append(results.paired(r, t, k))
                elif m != teacher and t and t["metrics"].get(k):  # grouped datasets (CQADupStack): means only
                    pairs.setdefault((kind, x), []).append(r["metrics"][k] / t["metrics"][k])
            ret = r.get("retention", {}).get("NDCG@10") or (
                {"value": r.get("retention_ndcg@10")} if m != teacher else None
            )
            mark = "*" if kind == "in-domain" else ""
            ndcg = fmt(r["metrics"]["NDCG@10"])
            cells.append(f"{ndcg} ({stats.fmt_ci(ret, 2)}){mark}" if ret else ndcg)
        for x in ("n", "r"):
            for k in kinds:
                got = pairs.get((k, x), [])
                if got and all(isinstance(p, tuple) for p in got):
                    cells.append(stats.fmt_ci(stats.mean_retention_ci(got, seed)))
                else:
                    cells.append(fmt(np.mean(got)) if got and all(isinstance(p, float) for p in got) else "-")
        cells += [fmt(np.mean(overlaps[k])) if overlaps.get(k) and m != teacher else "-" for k in kinds]
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "\n\n\\* the student trained on documents or queries of this collection (in-domain). Brackets: 95% paired "
        "bootstrap intervals over queries (stats.py)."
    )
    if leaked:
        note += f" {leaked} evaluation queries a student trained on are left out of its retention (leaked_queries)."
    return "\n".join(lines) + note + "\n"


def label_free_table(rows: list[dict], teacher: str) -> str:
    """Markdown of the label-free datasets: each student's agreement with the teacher's own ranking, with 95%
    intervals: overlap@10, the share of teacher top-1s in its top-10, the cosine to the teacher's query vector."""
    head = "| model | dataset | queries | overlap@10 | top-1 in top-10 | query cosine |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        if r["model"] == teacher or "metrics" in r or not r.get("agreement"):
            continue
        queries = f"{r['num_queries'] - r.get('leaked_queries', 0)}" + (
            f" ({r['leaked_queries']} trained on, left out)" if r.get("leaked_queries") else ""
        )
        cells = [stats.fmt_ci(r["agreement"][m], 2) for m in metrics.AGREEMENT]
        lines.append(f"| {r['model']} | {r['dataset']} | {queries} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nAgreement with the teacher on the same queries and index; no relevance labels.\n"


def group_rows(rows: list[dict]) -> list[dict]:
    """Add one averaged row per (model, group) for grouped datasets (CQADupStack = mean of its forums)."""
    groups, inside = {}, {}
    for r in rows:
        if r.get("group") and "metrics" in r:
            groups.setdefault((r["model"], r["group"]), []).append(r["metrics"])
            inside[(r["model"], r["group"])] = inside.get((r["model"], r["group"])) or r.get("in_domain_text", False)
    extra = []
    for (model, group), ms in groups.items():
        keys = set.intersection(*(set(m) for m in ms))
        mean = {k: float(np.mean([m[k] for m in ms])) for k in keys}
        extra.append({"model": model, "dataset": group, "metrics": mean, "in_domain_text": inside[(model, group)]})
    return [r for r in rows if not r.get("group")] + extra


def evaluation_tables(rows: list[dict], teacher: str, seed: int) -> tuple[list[dict], str]:
    """(rows with retention intervals and grouped means added, the markdown): the labelled table, then the
    label-free one, each only when it has rows."""
    retention_cis(rows, teacher, seed)
    rows = group_rows(rows)
    labelled = list(dict.fromkeys(r["dataset"] for r in rows if "metrics" in r))
    tables = [results_table(rows, labelled, teacher, seed)] if labelled else []
    if any("metrics" not in r for r in rows):
        tables.append(label_free_table(rows, teacher))
    return rows, "\n".join(tables)
