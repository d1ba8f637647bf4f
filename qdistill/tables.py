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
    kinds_of = {r["dataset"]: (r.get("doc_index") or {}).get("label", "flat") for r in rows}
    head = [
        "model",
        *[f"{d}{'' if kinds_of.get(d, 'flat') == 'flat' else f' [{kinds_of[d]}]'} nDCG@10 (ret.)" for d in datasets],
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
                elif m != teacher and k in r.get("group_ratio", {}):  # grouped datasets (CQADupStack): means only
                    pairs.setdefault((kind, x), []).append(r["group_ratio"][k])
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


def group_rows(rows: list[dict], teacher: str) -> list[dict]:
    """Add one averaged row per (model, group) for grouped datasets (CQADupStack = mean of its forums). A
    student's group ratio is the mean of its forum means over the teacher's, each forum paired through
    results.paired (made alike, same queries, leaked queries left out)."""
    by = {(r["model"], r["dataset"]): r for r in rows}
    groups = {}
    for r in rows:
        if r.get("group") and "metrics" in r:
            groups.setdefault((r["model"], r["group"]), []).append(r)
    extra = []
    for (model, group), forums in groups.items():
        keys = set.intersection(*(set(f["metrics"]) for f in forums))
        mean = {k: float(np.mean([f["metrics"][k] for f in forums])) for k in keys}
        row = {"model": model, "dataset": group, "metrics": mean}
        row["in_domain_text"] = any(f.get("in_domain_text", False) for f in forums)
        if model != teacher and all((teacher, f["dataset"]) in by for f in forums):
            ratio = {}
            for k in ("NDCG@10", "Recall@100"):
                if k not in keys:
                    continue
                paired = [results.paired(f, by[(teacher, f["dataset"])], k) for f in forums]
                s_mean = np.mean([np.mean(list(s.values())) for s, _ in paired])
                t_mean = np.mean([np.mean(list(t.values())) for _, t in paired])
                ratio[k] = float(s_mean / t_mean) if t_mean else None
            row["group_ratio"] = ratio
        extra.append(row)
    return [r for r in rows if not r.get("group")] + extra


def index_notes(rows: list[dict]) -> str:
    """Under the tables: each given index, how it was searched and checked, and the share of the corpus it holds."""
    seen, notes = set(), []
    for r in rows:
        given = r.get("doc_index") or {}
        if not given.get("given") or (r["dataset"], given.get("digest")) in seen:
            continue
        seen.add((r["dataset"], given.get("digest")))
        what = given.get("label", "flat")
        search = "exact search" if what == "flat" else f"approximate ({what}, as served: {given.get('served')})"
        share = given.get("corpus_share_indexed")
        held = f"; holds {share:.1%} of the corpus" if share is not None and share < 1 else ""
        checked = given.get("checked") or ("checked" if given.get("index_verified") else "not verified")
        notes.append(f"- {r['dataset']}: given {given.get('kind')} index, {search}; {checked}{held}")
    return ("\nGiven indexes:\n" + "\n".join(notes) + "\n") if notes else ""


def evaluation_tables(rows: list[dict], teacher: str, seed: int) -> tuple[list[dict], str]:
    """(rows with retention intervals and grouped means added, the markdown): the labelled table, then the
    label-free one, each only when it has rows."""
    retention_cis(rows, teacher, seed)
    rows = group_rows(rows, teacher)
    labelled = list(dict.fromkeys(r["dataset"] for r in rows if "metrics" in r))
    tables = [results_table(rows, labelled, teacher, seed)] if labelled else []
    if any("metrics" not in r for r in rows):
        tables.append(label_free_table(rows, teacher))
    return rows, "\n".join(tables) + index_notes(rows)
