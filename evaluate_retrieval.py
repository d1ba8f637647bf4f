"""Score student query encoders on BEIR against the teacher's own cached document index.

The teacher is always evaluated too (its query encoder against its index), so each student gets a
retention = student nDCG@10 / teacher nDCG@10 per dataset, and the mean of those ratios.

    python3 evaluate_retrieval.py --teacher_model sentence-transformers/all-MiniLM-L6-v2 \\
        --models output/all-MiniLM-L6-v2-L0-5/final --datasets scifact nfcorpus fiqa
    python3 evaluate_retrieval.py --teacher_model T --models S \\
        --datasets ../shared/data/scifact ../shared/data/cranfield --index hnsw

Outputs: output/index/<teacher>/<dataset>/ (cached teacher embeddings), one JSON per (model, dataset) in
output/retrieval/<teacher>/<model>/<dataset>.json, and the table output/retrieval/<teacher>/results.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import numpy as np

import common
from common import UsageError

logger = logging.getLogger("qdistill.retrieval")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teacher_model", default=common.PAPER_TEACHER, help="HF id or folder; its index is searched")
    p.add_argument(
        "--models", nargs="*", default=[], help="student models (HF ids or folders such as output/RUN/final)"
    )
    p.add_argument("--datasets", nargs="+", required=True, help="BEIR names or BEIR-format folders")
    p.add_argument("--data_dir", default=common.DATA_DIR, help="where BEIR names are looked for / downloaded to")
    p.add_argument("--split", default=None, help="qrels split (default: test; dev for msmarco)")
    p.add_argument("--k_values", type=int, nargs="+", default=[1, 3, 5, 10, 100])
    p.add_argument("--corpus_max_seq_length", type=int, default=None, help="default: the teacher's max_seq_length")
    p.add_argument("--corpus_batch_size", type=int, default=32)
    p.add_argument("--query_batch_size", type=int, default=128)
    p.add_argument("--encode_devices", nargs="+", default=None, help="several devices: multi-process corpus encoding")
    p.add_argument("--index", default="flat", choices=["flat", "hnsw", "ivfpq"], help="flat = exact inner product")
    p.add_argument("--output_path", default="output")
    p.add_argument("--save_run", action="store_true", help="also write a TREC run file per (model, dataset)")
    p.add_argument("--overwrite", action="store_true", help="re-evaluate finished (model, dataset) pairs")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--log_level", default="info")
    args = p.parse_args(argv)
    if any(k < 1 for k in args.k_values):
        p.error("--k_values must be positive")
    return args


# ----------------------------------------------------------------------------- search and metrics


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def build_faiss(doc_emb: np.ndarray, kind: str, seed: int = 42, chunk: int = 100_000, normalize: bool = False):
    """A faiss inner-product index over doc embeddings; normalize=True (cosine teachers) works chunk by chunk."""
    import faiss

    n, dim = doc_emb.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = 200, 128
    else:  # ivfpq: nlist ~ 4 sqrt(n), bounded so each list gets enough training points
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))
        m = next(m for m in (dim // 8, dim // 12, dim // 16, 8, 4, 2, 1) if m and dim % m == 0)
        nbits = int(min(8, max(1, np.floor(np.log2(max(n / 39, 2))))))
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = np.ascontiguousarray(
            doc_emb[np.sort(rng.choice(n, min(n, 100_000), replace=False))], dtype=np.float32
        )
        index.train(unit(sample) if normalize else sample)
        index.nprobe = max(1, nlist // 8)
    if kind == "flat" and hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)  # faiss-gpu installed and a GPU visible: search there
    for start in range(0, n, chunk):  # add in chunks: the memmap never needs to be fully in RAM
        block = np.ascontiguousarray(doc_emb[start : start + chunk], dtype=np.float32)
        index.add(unit(block) if normalize else block)
    return index


def search(index, q_emb: np.ndarray, k: int):
    """Top-k (scores, row ids); faiss pads with id -1 when k exceeds the corpus, so k is capped."""
    k = min(k, index.ntotal)
    scores, rows = index.search(np.ascontiguousarray(q_emb, dtype=np.float32), k)
    return scores, rows


def to_results(q_ids, doc_ids, scores, rows) -> dict[str, dict[str, float]]:
    out = {}
    for qid, srow, rrow in zip(q_ids, scores, rows):
        out[qid] = {doc_ids[r]: float(s) for s, r in zip(srow, rrow) if r >= 0}  # drop faiss -1 padding
    return out


def evaluate(qrels, results, k_values) -> dict[str, float]:
    from beir.retrieval.evaluation import EvaluateRetrieval

    # evaluate() mutates `results` (pops identical ids): hand it copies
    ndcg, _map, recall, precision = EvaluateRetrieval.evaluate(
        qrels, copy.deepcopy(results), k_values, ignore_identical_ids=True
    )
    mrr = EvaluateRetrieval.evaluate_custom(qrels, copy.deepcopy(results), [10], metric="mrr")
    return {**ndcg, **_map, **recall, **precision, **mrr}


def overlap_at_k(exact_rows, approx_rows, k) -> float:
    """Recall@k of an approximate index against exact search: shared top-k ids / k, averaged over queries."""
    hits = [len(set(e[:k]) & set(a[:k])) / min(k, len(e)) for e, a in zip(exact_rows, approx_rows)]
    return float(np.mean(hits))


# ----------------------------------------------------------------------------- datasets


def expand_datasets(names, data_dir) -> list[tuple[str, Path, str | None]]:
    """(display name, folder, group) per dataset; cqadupstack expands to its 12 forums (group = cqadupstack)."""
    out = []
    for name in names:
        if Path(name).name == "cqadupstack":
            root = common.dataset_path(name, data_dir)
            for forum in common.CQADUPSTACK_FORUMS:
                out.append((f"cqadupstack-{forum}", root / forum, "cqadupstack"))
        else:
            folder = common.dataset_path(name, data_dir)
            out.append((folder.name, folder, None))
    return out


# ----------------------------------------------------------------------------- the table


def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def results_table(rows: list[dict], datasets: list[str], teacher: str) -> str:
    """Markdown: rows = models, columns = nDCG@10 per dataset (retention), mean retention of nDCG@10 and R@100."""
    by = {(r["model"], r["dataset"]): r for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    head = ["model", *[f"{d} nDCG@10" for d in datasets], "mean ret. nDCG@10", "mean ret. R@100"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        cells, ret, ret100 = [m + (" (teacher)" if m == teacher else "")], [], []
        for d in datasets:
            r, t = by.get((m, d)), by.get((teacher, d))
            if r is None:
                cells.append("-")
                continue
            if t and t["metrics"]["NDCG@10"] > 0:
                ret.append(r["metrics"]["NDCG@10"] / t["metrics"]["NDCG@10"])
            if t and t["metrics"].get("Recall@100", 0) > 0:
                ret100.append(r["metrics"]["Recall@100"] / t["metrics"]["Recall@100"])
            cells.append(f"{fmt(r['metrics']['NDCG@10'])} ({fmt(ret[-1], 2) if t else '-'})")
        cells += [fmt(np.mean(ret) if ret else None), fmt(np.mean(ret100) if ret100 else None)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def group_rows(rows: list[dict]) -> list[dict]:
    """Add one averaged row per (model, group) for grouped datasets (CQADupStack = mean of its forums)."""
    groups = {}
    for r in rows:
        if r.get("group"):
            groups.setdefault((r["model"], r["group"]), []).append(r["metrics"])
    extra = []
    for (model, group), ms in groups.items():
        keys = set.intersection(*(set(m) for m in ms))
        extra.append(
            {"model": model, "dataset": group, "metrics": {k: float(np.mean([m[k] for m in ms])) for k in keys}}
        )
    return [r for r in rows if not r.get("group")] + extra


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.start_run(args)
    config = common.run_info(args)
    teacher, teacher_path = common.load_model(args.teacher_model, device=device)
    sim = common.similarity_name(teacher)  # the teacher's own score function, not beir's cosine default
    t_dim = teacher.get_embedding_dimension()
    out_root = Path(args.output_path) / "retrieval" / common.slug(args.teacher_model)
    model_names = [args.teacher_model, *[m for m in args.models if m != args.teacher_model]]
    loaded = {args.teacher_model: teacher}
    datasets = expand_datasets(args.datasets, args.data_dir)  # fail on a missing dataset before any work
    max_k = max(args.k_values)

    rows = []
    for dname, folder, group in datasets:
        split = args.split or ("dev" if dname == "msmarco" else "test")
        corpus, queries, qrels, data_stats = common.load_beir(folder, split)
        doc_emb, doc_ids, index_meta = common.teacher_index(
            teacher, args.teacher_model, teacher_path, corpus, folder / "corpus.jsonl", args.output_path,
            args.corpus_max_seq_length, args.corpus_batch_size, devices=args.encode_devices,
        )  # fmt: skip
        index_key = common.sha256_texts([json.dumps(index_meta["key"], sort_keys=True)])[:16]
        pending = []
        for name in model_names:
            path = out_root / common.slug(name) / f"{dname}.json"
            if path.exists() and not args.overwrite:
                old = json.loads(path.read_text())
                if old.get("index_key") == index_key and old.get("index") == args.index and old.get("split") == split:
                    logger.info("%s on %s: finished earlier, skipping (--overwrite to redo)", name, dname)
                    rows.append({**old, "group": group})
                    continue
            pending.append((name, path))
        if not pending:
            continue

        t0 = time.perf_counter()
        cosine = sim == "cosine"  # cosine teachers: inner product over unit vectors
        index = build_faiss(doc_emb, args.index, args.seed, normalize=cosine)
        exact = build_faiss(doc_emb, "flat", normalize=cosine) if args.index != "flat" else None
        build_secs = time.perf_counter() - t0
        q_ids = sorted(queries)
        q_texts = [queries[q] for q in q_ids]
        teacher_ndcg = None
        for name, path in pending:
            if name not in loaded:
                loaded[name], _ = common.load_model(name, device=device)
            model = loaded[name]
            if model.get_embedding_dimension() != t_dim:
                raise UsageError(
                    f"{name} gives {model.get_embedding_dimension()}-d embeddings but the teacher index is {t_dim}-d; "
                    "train it with distillation.py against this teacher (a projection is added there)"
                )
            t0 = time.perf_counter()
            q_emb = model.encode_query(q_texts, batch_size=args.query_batch_size, convert_to_numpy=True)
            enc_secs = time.perf_counter() - t0
            if cosine:
                q_emb = unit(q_emb)
            t0 = time.perf_counter()
            scores, ids = search(index, q_emb, max_k)
            search_secs = time.perf_counter() - t0
            results = to_results(q_ids, doc_ids, scores, ids)
            metrics = evaluate(qrels, results, args.k_values)
            record = {
                "model": name,
                "dataset": dname,
                "dataset_path": str(folder),
                "split": split,
                "teacher": args.teacher_model,
                "similarity": sim,
                "index": args.index,
                "index_key": index_key,
                "num_queries": len(q_ids),
                "num_docs": len(doc_ids),
                "metrics": metrics,
                "timings": {
                    "query_encode_seconds": round(enc_secs, 3),
                    "queries_per_second": round(len(q_ids) / enc_secs, 1),
                    "search_seconds": round(search_secs, 4),
                    "index_build_seconds": round(build_secs, 3),
                    "corpus_encode_seconds": index_meta.get("encode_seconds"),
                },
                "data_stats": data_stats,
                "config": config,
            }
            if exact is not None:
                _, exact_ids = search(exact, q_emb, max_k)
                record["approx_recall"] = {f"@{k}": overlap_at_k(exact_ids, ids, k) for k in (10, 100) if k <= max_k}
            if name == args.teacher_model:
                teacher_ndcg = metrics["NDCG@10"]
            else:
                if teacher_ndcg is None:
                    teacher_ndcg = json.loads(
                        (out_root / common.slug(args.teacher_model) / f"{dname}.json").read_text()
                    )["metrics"]["NDCG@10"]
                record["retention_ndcg@10"] = metrics["NDCG@10"] / teacher_ndcg if teacher_ndcg else None
            common.write_json(path, record)
            if args.save_run:
                lines = [
                    f"{qid} Q0 {did} {rank} {score:.6f} {common.slug(name)}"
                    for qid in q_ids
                    for rank, (did, score) in enumerate(sorted(results[qid].items(), key=lambda x: -x[1]), 1)
                ]
                common.write_text(path.with_suffix(".trec"), "\n".join(lines) + "\n")
            logger.info(
                "%s on %s: nDCG@10 %.4f R@100 %.4f (%d queries, encode %.2fs, search %.3fs)",
                name, dname, metrics["NDCG@10"], metrics.get("Recall@100", float("nan")), len(q_ids), enc_secs,
                search_secs,
            )  # fmt: skip
            rows.append({**record, "group": group})

    rows = group_rows(rows)
    shown = list(dict.fromkeys(r["dataset"] for r in rows))
    table = results_table(rows, shown, args.teacher_model)
    common.write_text(out_root / "results.md", table)
    print(table)
    return {"rows": rows, "table": table}


if __name__ == "__main__":
    common.cli(main)
