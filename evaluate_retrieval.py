"""Score student query encoders on BEIR against the teacher's own cached document index.

The teacher is always evaluated too (its query encoder against its index), so each student gets a
retention = student nDCG@10 / teacher nDCG@10 per dataset, and the mean of those ratios.

    python evaluate_retrieval.py --teacher_model sentence-transformers/all-MiniLM-L6-v2 \\
        --models output/all-MiniLM-L6-v2-L0-5/final --datasets scifact nfcorpus fiqa
    python evaluate_retrieval.py --teacher_model T --models S \\
        --datasets $DATA_DIR/scifact $DATA_DIR/cranfield --index hnsw

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

import cache
import common
import data
import loading
import serving
from common import UsageError, positive_int
from search import build_faiss, cached_faiss, check_index_size, search, unit

logger = logging.getLogger("qdistill.retrieval")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("--teacher_model", default=common.PAPER_TEACHER, help="HF id or folder; its document index is searched")
    add("--models", nargs="*", default=[], help="student models (HF ids or folders such as output/RUN/final)")
    add("--datasets", nargs="+", required=True, help="BEIR names or BEIR-format folders")
    add("--data_dir", default=common.DATA_DIR, help="where BEIR names are looked for / downloaded to")
    add("--split", default=None, help="qrels split (default: test; dev for msmarco)")
    add("--k_values", type=positive_int, nargs="+", default=[1, 3, 5, 10, 100], help="must include 10")
    add("--corpus_max_seq_length", type=positive_int, default=None, help="default: the teacher's max_seq_length")
    add("--corpus_batch_size", type=positive_int, default=32)
    add("--query_batch_size", type=positive_int, default=128)
    add("--encode_devices", nargs="+", default=None, help="several devices: multi-process corpus encoding")
    add("--index", default="flat", choices=["flat", "hnsw", "ivfpq"], help="flat = exact inner product")
    add("--output_path", default="output")
    add("--save_run", action="store_true", help="also write a TREC run file per (model, dataset)")
    add("--overwrite", action="store_true", help="re-evaluate finished (model, dataset) pairs")
    add("--device", default="auto")
    add("--seed", type=int, default=42)
    add("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    if 10 not in args.k_values:
        p.error("--k_values must include 10: nDCG@10 is the reported metric and the base of retention")
    args.k_values = sorted(set(args.k_values))
    return args


# ----------------------------------------------------------------------------- search and metrics


def retrieve(index, q_emb, q_ids, doc_ids, k: int) -> dict[str, dict[str, float]]:
    """Top-k results per query. Searches k+1, as beir does: evaluation drops a document whose id equals the
    query's (ArguAna, Quora), and k hits must remain after that. faiss's -1 padding ids are dropped."""
    scores, rows = search(index, q_emb, k + 1)
    return to_results(q_ids, doc_ids, scores, rows)


def to_results(q_ids, doc_ids, scores, rows) -> dict[str, dict[str, float]]:
    out = {}
    for qid, srow, rrow in zip(q_ids, scores, rows):
        out[qid] = {doc_ids[r]: float(s) for s, r in zip(srow, rrow) if r >= 0}  # drop faiss -1 padding
    return out


def drop_own_ids(qrels, results) -> tuple[dict, int]:
    """(results without each query's own id, how many were dropped). On ArguAna and Quora a query is also a
    document and finds itself; that hit is dropped, unless the qrels judge it relevant for that very query
    (Cranfield's query 225 has document 225 relevant): beir's ignore_identical_ids would drop that one too."""
    out, dropped = {}, 0
    for qid, docs in results.items():
        if qid in docs and qrels.get(qid, {}).get(qid, 0) <= 0:
            docs, dropped = {d: s for d, s in docs.items() if d != qid}, dropped + 1
        out[qid] = docs
    return out, dropped


def evaluate(qrels, results, k_values) -> tuple[dict[str, float], int]:
    """(metrics, identical ids dropped): every metric, MRR@10 included, on the results with own ids dropped."""
    from beir.retrieval.evaluation import EvaluateRetrieval

    results, dropped = drop_own_ids(qrels, results)
    # evaluate() mutates `results`: hand it copies
    ndcg, _map, recall, precision = EvaluateRetrieval.evaluate(
        qrels, copy.deepcopy(results), k_values, ignore_identical_ids=False
    )
    mrr = EvaluateRetrieval.evaluate_custom(qrels, copy.deepcopy(results), [10], metric="mrr")
    return {**ndcg, **_map, **recall, **precision, **mrr}, dropped


def overlap_at_k(exact_rows, approx_rows, k) -> float:
    """Recall@k of an approximate index against exact search: shared top-k ids / k, averaged over queries."""
    hits = [len(set(e[:k]) & set(a[:k])) / min(k, len(e)) for e, a in zip(exact_rows, approx_rows)]
    return float(np.mean(hits))


# ----------------------------------------------------------------------------- the table


def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def results_table(rows: list[dict], datasets: list[str], teacher: str) -> str:
    """Markdown: rows = models, columns = nDCG@10 per dataset (retention; * = the student trained on that
    collection's text), then mean retention of nDCG@10 and R@100 over zero-shot and in-domain-text datasets
    apart: the two are never mixed into one number."""
    by = {(r["model"], r["dataset"]): r for r in rows}
    kinds = ("zero-shot", "in-domain")
    head = [
        "model",
        *[f"{d} nDCG@10" for d in datasets],
        *[f"{k} ret. {m}" for m in ("nDCG@10", "R@100") for k in kinds],
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in dict.fromkeys(r["model"] for r in rows):
        cells, ret = [m + (" (teacher)" if m == teacher else "")], {(k, x): [] for k in kinds for x in ("n", "r")}
        for d in datasets:
            r, t = by.get((m, d)), by.get((teacher, d))
            if r is None:
                cells.append("-")
                continue
            kind = "in-domain" if r.get("in_domain_text") else "zero-shot"
            ratio = {x: r["metrics"][k] / t["metrics"][k] if t and t["metrics"].get(k) else None
                     for x, k in (("n", "NDCG@10"), ("r", "Recall@100"))}  # fmt: skip
            for x, v in ratio.items():
                if v is not None:
                    ret[(kind, x)].append(v)
            mark = "*" if kind == "in-domain" else ""
            cells.append(f"{fmt(r['metrics']['NDCG@10'])} ({fmt(ratio['n'], 2)}){mark}")
        cells += [fmt(np.mean(ret[(k, x)]) if ret[(k, x)] else None) for x in ("n", "r") for k in kinds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n\\* the student trained on text of this collection (in-domain text)\n"


def in_domain(sources: dict | None, folder: Path, corpus_sha256: str, queries_sha256: str, overlap: int) -> bool:
    """A collection is in-domain for a student that trained on its documents, on its query file (same content,
    or a file inside its folder), or on any of its evaluation queries (overlap: the leak guard's count)."""
    if not sources:
        return False
    if overlap or corpus_sha256 in {c["corpus_sha256"] for c in sources.get("corpora", []) if c.get("texts", 1)}:
        return True
    for f in sources.get("query_files", []):
        record = f if isinstance(f, dict) else {"path": f}  # records written before content hashes: paths only
        if record.get("sha256") == queries_sha256 or Path(record["path"]).resolve().is_relative_to(folder.resolve()):
            return True
    return False


def training_overlap(sources: dict | None, query_texts) -> int:
    """How many evaluation queries (normalised text) the student trained on: the leak guard."""
    trained = set((sources or {}).get("text_hashes", []))
    return sum(h in trained for h in (data.text_hashes([t])[0] for t in query_texts)) if trained else 0


def group_rows(rows: list[dict]) -> list[dict]:
    """Add one averaged row per (model, group) for grouped datasets (CQADupStack = mean of its forums)."""
    groups, inside = {}, {}
    for r in rows:
        if r.get("group"):
            groups.setdefault((r["model"], r["group"]), []).append(r["metrics"])
            inside[(r["model"], r["group"])] = inside.get((r["model"], r["group"])) or r.get("in_domain_text", False)
    extra = []
    for (model, group), ms in groups.items():
        keys = set.intersection(*(set(m) for m in ms))
        mean = {k: float(np.mean([m[k] for m in ms])) for k in keys}
        extra.append({"model": model, "dataset": group, "metrics": mean, "in_domain_text": inside[(model, group)]})
    return [r for r in rows if not r.get("group")] + extra


# ----------------------------------------------------------------------------- main


def dataset_hashes(folder: Path, split: str) -> tuple[str, str, str]:
    """(digest of corpus, queries and this split's qrels; the corpus file's sha256; the query file's sha256)."""
    hashes = [cache.sha256_file(f) for f in data.check_beir(folder, split)]
    return cache.sha256_texts(hashes)[:16], hashes[0], hashes[1]


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.start_run(args.log_level, args.seed, args.output_path)
    device = common.pick_device(args.device)
    config = common.run_info(vars(args), device)
    # every dataset and model path is checked before the teacher loads or any index is built
    datasets = []
    for dname, folder, group in data.expand_datasets(args.datasets, args.data_dir):
        split = args.split or ("dev" if folder.name == "msmarco" else "test")
        corpus = data.load_beir(folder, split)[0]  # malformed files fail here, not after an hour of indexing
        check_index_size(args.index, len(corpus), dname)
        datasets.append((dname, folder, group, split, *dataset_hashes(folder, split)))
    names = list(dict.fromkeys([args.teacher_model, *args.models]))
    paths = {name: loading.resolve_model_path(name, args.data_dir) for name in names}
    for name in names[1:]:  # a damaged export fails here, before the teacher loads
        if serving.is_export(paths[name]):
            serving.check_export(paths[name])
    teacher, _ = loading.load_model(args.teacher_model, device, path=paths[args.teacher_model])
    models = {args.teacher_model: teacher}
    for name in names[1:]:  # an ONNX Runtime export is evaluated through the lean query path it deploys with
        exported = serving.is_export(paths[name])
        models[name] = (
            serving.LeanEncoder(paths[name]) if exported else loading.load_model(name, device, paths[name])[0]
        )
        dim = models[name].meta["dim"] if exported else models[name].get_embedding_dimension()
        if dim != teacher.get_embedding_dimension():
            raise UsageError(
                f"{name} gives {dim}-d embeddings but the teacher index is {teacher.get_embedding_dimension()}-d; "
                "train it with distillation.py against this teacher"
            )
    sim = loading.similarity_name(teacher)  # the teacher's own score function, not beir's cosine default
    sources = {name: common.text_sources(paths[name]) for name in names}
    out_root = Path(args.output_path) / "retrieval" / common.slug(args.teacher_model)

    rows = []
    for dname, folder, group, split, digest, corpus_sha, queries_sha in datasets:
        corpus, queries, qrels, data_stats = data.load_beir(folder, split)
        doc_emb, doc_ids, index_meta = cache.teacher_index(
            teacher,
            args.teacher_model,
            paths[args.teacher_model],
            corpus,
            folder / "corpus.jsonl",
            args.output_path,
            args.corpus_max_seq_length,
            args.corpus_batch_size,
            devices=args.encode_devices,
        )
        index_digest = cache.sha256_texts([json.dumps(index_meta["key"], sort_keys=True)])[:16]
        settings = {
            "dataset": digest,
            "split": split,
            "index": args.index,
            "teacher_index": index_digest,
            "k_values": args.k_values,
            "similarity": sim,
            "faiss": __import__("faiss").__version__,
            **({"seed": args.seed} if args.index != "flat" else {}),  # hnsw/ivfpq are built with the seed
        }
        records, pending = {}, []
        for name in names:  # finished results are reused only when model, data and settings all match
            runtime = {"onnxruntime": __import__("onnxruntime").__version__} if serving.is_export(paths[name]) else {}
            key, key_digest = cache.cache_key("retrieval", paths[name], {**settings, **runtime})
            path = out_root / common.slug(name) / f"{dname}.json"
            old = json.loads(path.read_text()) if path.exists() and not args.overwrite else {}
            if old.get("result_key") == key_digest:
                logger.info("%s on %s: finished earlier with the same model, data and settings, reusing", name, dname)
                records[name] = old
            else:
                pending.append((name, path, key, key_digest))
        if pending:
            records.update(
                evaluate_models(
                    pending, models, corpus, queries, qrels, doc_emb, doc_ids, index_meta, args, sim, config
                )
            )
        teacher_ndcg = records[args.teacher_model]["metrics"]["NDCG@10"]
        for name in names:
            record = {**records[name], "dataset": dname, "dataset_path": str(folder), "split": split}
            if name != args.teacher_model:
                record["retention_ndcg@10"] = record["metrics"]["NDCG@10"] / teacher_ndcg if teacher_ndcg else None
                overlap = training_overlap(sources[name], queries.values())
                if overlap:
                    logger.warning("%s trained on %d of the %d %s queries: in-domain, not zero-shot", name, overlap,
                                   len(queries), dname)  # fmt: skip
                record["training_text_sources"] = {k: v for k, v in (sources[name] or {}).items() if k != "text_hashes"}
                record["training_query_overlap"] = overlap
                record["in_domain_text"] = in_domain(sources[name], folder, corpus_sha, queries_sha, overlap)
                record["training_text"] = "in-domain" if record["in_domain_text"] else "zero-shot"
            record["data_stats"] = data_stats
            if name in {p[0] for p in pending}:  # fresh results are written; reused ones stay as they are
                common.write_json(out_root / common.slug(name) / f"{dname}.json", record)
            rows.append({**record, "group": group, "reused": name not in {p[0] for p in pending}})

    rows = group_rows(rows)
    shown = list(dict.fromkeys(r["dataset"] for r in rows))
    table = results_table(rows, shown, args.teacher_model)
    common.write_text(out_root / "results.md", table)
    print(table)
    return {"rows": rows, "table": table}


def evaluate_models(pending, models, corpus, queries, qrels, doc_emb, doc_ids, index_meta, args, sim, config):
    """{model name: record} for the models not evaluated before on this dataset; TREC runs on --save_run."""
    t0 = time.perf_counter()
    cosine = sim == "cosine"  # cosine teachers: inner product over unit vectors
    index = cached_faiss(doc_emb, args.index, index_meta["folder"], args.seed, normalize=cosine)
    exact = build_faiss(doc_emb, "flat", normalize=cosine) if args.index != "flat" else None
    build_secs = time.perf_counter() - t0
    q_ids = sorted(queries)
    q_texts = [queries[q] for q in q_ids]
    max_k = max(args.k_values)
    out = {}
    for name, path, key, key_digest in pending:
        t0 = time.perf_counter()
        model = models[name]
        if isinstance(model, serving.LeanEncoder):
            q_emb = model.encode(q_texts, batch_size=args.query_batch_size)
        else:
            q_emb = model.encode_query(q_texts, batch_size=args.query_batch_size, convert_to_numpy=True)
        enc_secs = time.perf_counter() - t0
        q_emb = unit(q_emb) if cosine else q_emb
        t0 = time.perf_counter()
        results = retrieve(index, q_emb, q_ids, doc_ids, max_k)
        search_secs = time.perf_counter() - t0
        metrics, dropped = evaluate(qrels, results, args.k_values)
        out[name] = {
            "model": name,
            "backend": serving.backend_name(model.meta) if isinstance(model, serving.LeanEncoder) else "torch",
            "teacher": args.teacher_model,
            "similarity": sim,
            "index": args.index,
            "result_key": key_digest,
            "key": key,
            "num_queries": len(q_ids),
            "num_docs": len(doc_ids),
            "identical_ids_dropped": dropped,
            "metrics": metrics,
            "timings": {
                "query_encode_seconds": round(enc_secs, 3),
                "search_seconds": round(search_secs, 4),
                "queries_per_second": round(len(q_ids) / enc_secs, 1),
                "index_build_seconds": round(build_secs, 3),
                "corpus_encode_seconds": index_meta.get("encode_seconds"),
            },
            "config": config,
        }
        if exact is not None:
            exact_ids = search(exact, q_emb, max_k)[1]
            approx_ids = search(index, q_emb, max_k)[1]
            out[name]["approx_recall"] = {
                f"@{k}": overlap_at_k(exact_ids, approx_ids, k) for k in (10, 100) if k <= max_k
            }
        if args.save_run:
            lines = [
                f"{qid} Q0 {did} {rank} {score:.6f} {common.slug(name)}"
                for qid in q_ids
                for rank, (did, score) in enumerate(sorted(results[qid].items(), key=lambda x: -x[1]), 1)
            ]
            common.write_text(path.with_suffix(".trec"), "\n".join(lines) + "\n")
        logger.info(
            "%s: nDCG@10 %.4f R@%d %.4f (%d queries, encode %.2fs, search %.3fs)",
            name,
            metrics["NDCG@10"],
            max_k,
            metrics.get(f"Recall@{max_k}", float("nan")),
            len(q_ids),
            enc_secs,
            search_secs,
        )
    return out


if __name__ == "__main__":
    common.cli(main)
