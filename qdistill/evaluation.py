"""One evaluation of students against the teacher's own index: models loaded and checked, the document side
(built here, or the user's), search, relevance metrics, agreement, and result files reused only when made
by the same model, data and settings."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from qdistill import (
    encoders,
    given_index,
    index_check,
    lean,
    metrics,
    onnx_export,
    results,
    run_files,
    search,
    teacher_outputs,
)
from qdistill.cli import UsageError
from qdistill.eval_data import Dataset, EvalSettings, corpus_text, load_dataset, own_ids
from qdistill.in_domain import mark_training_text
from qdistill.search import cached_faiss, unit

logger = logging.getLogger(__name__)

# 3: what made the result (made_alike), leaked queries and own ids in every result file; older ones are recomputed
RESULT_SCHEMA = 3


def model_paths(cfg: EvalSettings) -> dict:
    """{name: local folder} of the teacher (first) and each student, in order, each resolved once."""
    names = dict.fromkeys([cfg.teacher_model, *cfg.models])
    return {name: encoders.resolve_model_path(name, cfg.data_dir) for name in names}


def results_root(cfg: EvalSettings) -> Path:
    """output/retrieval/<teacher>/: one folder per model, one result file per dataset, and the tables."""
    return Path(cfg.output_path) / "retrieval" / run_files.slug(cfg.teacher_model)


def load_models(cfg: EvalSettings, paths: dict, device: str, datasets):
    """{name: model}: the teacher and each student (an ONNX Runtime export through its lean query path). Each
    given --doc_index is checked against the teacher before any student loads."""
    names = list(paths)
    for name in names[1:]:  # a damaged export fails here, before the teacher loads
        if onnx_export.is_export(paths[name]):
            onnx_export.check_export(paths[name])
    teacher, _ = encoders.load_model(cfg.teacher_model, device, path=paths[cfg.teacher_model])
    checked = [(ds._replace(doc_index=check_index(cfg, ds, teacher)), q) for ds, q in datasets]
    models = {cfg.teacher_model: teacher}
    for name in names[1:]:
        exported = onnx_export.is_export(paths[name])
        models[name] = (
            lean.LeanEncoder(paths[name]) if exported else encoders.load_model(name, device, path=paths[name])[0]
        )
        dim = models[name].get_embedding_dimension()
        if dim != teacher.get_embedding_dimension():
            raise UsageError(
                f"{name} gives {dim}-d embeddings but the teacher index is {teacher.get_embedding_dimension()}-d; "
                "train it with distillation.py against this teacher"
            )
    return models, checked


def check_index(cfg: EvalSettings, ds: Dataset, teacher):
    """The dataset's given index, checked to belong to the teacher (index_check.verify on a seeded sample of its
    documents, encoded as the teacher's own index would be); its record is kept on the index."""
    index = ds.doc_index
    if index is None:
        return None
    sim = encoders.similarity_name(teacher)
    index_check.check_shape(index, teacher.get_embedding_dimension(), sim, cfg.teacher_model)
    corpus, _ = corpus_text(ds.folder, index)

    def encode(ids):
        with encoders.max_length(teacher, cfg.corpus_max_seq_length):
            texts = [teacher_outputs.doc_text(corpus[i]) for i in ids]
            return teacher.encode_document(texts, batch_size=cfg.corpus_batch_size, convert_to_numpy=True)

    index.verification = index_check.verify(index, encode, corpus, sim, cfg.teacher_model, cfg.seed)
    return index


def document_side(cfg: EvalSettings, ds: Dataset, teacher, teacher_path, corpus, corpus_file):
    """(DocIndex, its record) of a dataset: the given --doc_index, or the teacher index built here (cached)."""
    if ds.doc_index is not None:
        index = ds.doc_index
        record = {"given": True, "digest": index.digest(), "documents_encoded": 0, **index.verification}
        record.update(kind=index.kind, faiss_type=index.faiss_type, num_docs=len(index))
        return index, {**record, "folder": Path(cfg.output_path) / "index" / "given" / index.digest()}
    doc_emb, doc_ids, meta = teacher_outputs.teacher_index(
        teacher,
        cfg.teacher_model,
        teacher_path,
        corpus,
        corpus_file,
        cfg.output_path,
        cfg.corpus_max_seq_length,
        cfg.corpus_batch_size,
        devices=cfg.encode_devices,
    )
    if cfg.export_index:
        cosine = encoders.similarity_name(teacher) == "cosine"
        folder = given_index.write_pyserini(Path(cfg.export_index) / ds.name, doc_emb, doc_ids, cosine)
        logger.info("wrote the teacher index of %s in pyserini's layout: %s", ds.name, folder)
    index = given_index.open_npy(Path(meta["folder"]) / "embeddings.npy", doc_ids)
    digest = teacher_outputs.sha256_texts([json.dumps(meta["key"], sort_keys=True)])[:16]
    record = {"given": False, "digest": digest, "documents_encoded": meta["num_docs"], "index_verified": True}
    return index, {**record, "folder": meta["folder"], "encode_seconds": meta.get("encode_seconds")}


def evaluate_dataset(cfg: EvalSettings, ds: Dataset, queries, paths, models, sources, config) -> list[dict]:
    """One row per model on one dataset: finished results reused when model, data and settings all match."""
    names, out_root = list(paths), results_root(cfg)
    corpus, corpus_file, queries, qrels, data_stats, collection = load_dataset(ds, queries)
    own = own_ids(ds, queries, corpus, cfg.self_retrieval)
    teacher = models[cfg.teacher_model]
    index, index_meta = document_side(cfg, ds, teacher, paths[cfg.teacher_model], corpus, corpus_file)
    sim = encoders.similarity_name(teacher)  # the teacher's own score function, not beir's cosine default
    settings = {
        "dataset": ds.digest,
        "split": ds.split,
        "index": cfg.index,
        # the index by content (its files' digests and faiss type, or the built index's key), never by path
        "teacher_index": index_meta["digest"],
        "index_verified": index_meta["index_verified"],
        "k_values": cfg.k_values,
        "similarity": sim,
        "own_ids": teacher_outputs.sha256_texts(sorted(own))[:16],
        "faiss": __import__("faiss").__version__,
        "schema": RESULT_SCHEMA,
        # hnsw/ivfpq: built with the seed and these settings
        **({"index_seed": cfg.index_seed, "index_build": search.BUILD[cfg.index]} if cfg.index != "flat" else {}),
    }
    records, pending = {}, []
    for name in names:
        runtime = {"onnxruntime": __import__("onnxruntime").__version__} if onnx_export.is_export(paths[name]) else {}
        key, key_digest = teacher_outputs.cache_key("retrieval", paths[name], {**settings, **runtime})
        path = out_root / run_files.slug(name) / results.result_file(ds.name, cfg.index)
        old = json.loads(path.read_text()) if path.exists() and not cfg.overwrite else {}
        if old.get("result_key") == key_digest and (not cfg.save_run or path.with_suffix(".trec").is_file()):
            logger.info("%s on %s: finished earlier with the same model, data and settings, reusing", name, ds.name)
            records[name] = old
        else:
            pending.append((name, path, key, key_digest))
    if pending:
        found = evaluate_models(pending, models, queries, qrels, own, index, index_meta, cfg, sim, config)
        records.update({n: {**r, "made_alike": results.made_alike(settings)} for n, r in found.items()})
    rows, fresh = [], {p[0] for p in pending}
    for name in names:
        record = {**records[name], "dataset": ds.name, "dataset_path": str(ds.folder), "split": ds.split}
        if name != cfg.teacher_model:
            teacher_record = records[cfg.teacher_model]
            mark_training_text(record, teacher_record, sources[name], ds, queries, collection, cfg.seed)
        record["data_stats"] = data_stats
        if name in fresh:  # fresh results are written; reused ones stay as they are
            run_files.write_json(out_root / run_files.slug(name) / results.result_file(ds.name, cfg.index), record)
        rows.append({**record, "group": ds.group, "reused": name not in fresh})
    return rows


def retrieve(searcher, q_emb, q_ids, doc_ids, k: int) -> dict[str, dict[str, float]]:
    """Top-k results per query. Searches k+1: evaluation drops a document whose id equals the query's (ArguAna,
    Quora), and k hits must remain after that."""
    scores, rows = searcher(q_emb, k + 1)
    return to_results(q_ids, doc_ids, scores, rows)


def to_results(q_ids, doc_ids, scores, rows) -> dict[str, dict[str, float]]:
    """{query id: {doc id: score}} from faiss's arrays; faiss's -1 padding ids are dropped."""
    return {
        qid: {doc_ids[r]: float(s) for s, r in zip(srow, rrow) if r >= 0}
        for qid, srow, rrow in zip(q_ids, scores, rows)
    }


def encode_and_search(model, searcher, q_texts, q_ids, doc_ids, cfg, cosine):
    """(query embeddings, results with own ids dropped where unjudged, encode seconds, search seconds)."""
    t0 = time.perf_counter()
    q_emb = model.encode_query(q_texts, batch_size=cfg.query_batch_size, convert_to_numpy=True)
    enc_secs = time.perf_counter() - t0
    q_emb = unit(q_emb) if cosine else np.asarray(q_emb, np.float32)
    t0 = time.perf_counter()
    found = retrieve(searcher, q_emb, q_ids, doc_ids, max(cfg.k_values))
    return q_emb, found, enc_secs, time.perf_counter() - t0


def score(qrels, found, k_values, own) -> dict:
    """Relevance metrics and their per-query values; nothing without qrels (label-free: agreement only)."""
    if qrels is None:
        return {}
    values, dropped = metrics.evaluate(qrels, found, k_values, own)
    return {
        "metrics": values,
        "own_id_queries": len(own),
        "identical_ids_dropped": dropped,
        "per_query": metrics.per_query(qrels, found, k_values, own),
    }


def searchers(index: given_index.DocIndex, kind: str, folder, seed: int, cosine: bool):
    """(search, exact search or None): a given faiss file searched as built; else exact search over the vectors
    (chunk by chunk), or an hnsw/ivfpq index built from them once, with exact search beside it for its recall."""

    def exact(q, k):
        return index.search(q, k, cosine)

    if kind == "flat" or index.searched_as_built:
        return exact, None
    approx = cached_faiss(np.load(index.path, mmap_mode="r"), kind, folder, seed, normalize=cosine)
    return (lambda q, k: search.search(approx, q, k)), exact


def evaluate_models(pending, models, queries, qrels, own, index, index_meta, cfg, sim, config):
    """{model name: record} for the models not evaluated before on this dataset; TREC runs on --save_run."""
    t0 = time.perf_counter()
    cosine = sim == "cosine"  # cosine teachers: inner product over unit vectors
    searcher, exact = searchers(index, cfg.index, index_meta["folder"], cfg.index_seed, cosine)
    doc_ids = index.ids
    build_secs = time.perf_counter() - t0
    q_ids = sorted(queries)
    q_texts = [queries[q] for q in q_ids]
    max_k = max(cfg.k_values)
    # the teacher's own ranking and query embeddings: what each student's agreement is measured against
    teacher_run = encode_and_search(models[cfg.teacher_model], searcher, q_texts, q_ids, doc_ids, cfg, cosine)
    t_emb, t_results = teacher_run[:2]
    t_top = metrics.top_ids(metrics.drop_own_ids(qrels, t_results, own)[0], 10)
    out = {}
    for name, path, key, key_digest in pending:
        model = models[name]
        q_emb, found, enc_secs, search_secs = (
            teacher_run
            if name == cfg.teacher_model
            else encode_and_search(model, searcher, q_texts, q_ids, doc_ids, cfg, cosine)
        )
        record = result_record(name, model, cfg, sim, index_meta, key, key_digest, config)
        record.update(num_queries=len(q_ids), num_docs=len(doc_ids))
        record["timings"] = {
            "query_encode_seconds": round(enc_secs, 3),
            "search_seconds": round(search_secs, 4),
            "queries_per_second": round(len(q_ids) / enc_secs, 1),
            "index_build_seconds": round(build_secs, 3),
            "corpus_encode_seconds": index_meta.get("encode_seconds"),
            "documents_encoded": index_meta["documents_encoded"],
        }
        record.update(score(qrels, found, cfg.k_values, own))
        if name != cfg.teacher_model:
            s_top = metrics.top_ids(metrics.drop_own_ids(qrels, found, own)[0], 10)
            agree = metrics.agreement(s_top, t_top, q_emb, t_emb, q_ids, cfg.seed)
            record["agreement"] = agree["summary"]
            record.setdefault("per_query", {}).update(agree["per_query"])
        if exact is not None:
            exact_ids, approx_ids = exact(q_emb, max_k)[1], searcher(q_emb, max_k)[1]
            record["approx_recall"] = {
                f"@{k}": metrics.overlap_at_k(exact_ids, approx_ids, k) for k in (10, 100) if k <= max_k
            }
        if cfg.save_run:
            write_trec(path.with_suffix(".trec"), name, q_ids, found)
        summary = (
            f"nDCG@10 {record['metrics']['NDCG@10']:.4f}"
            if qrels is not None
            else f"overlap@10 {record.get('agreement', {}).get('overlap@10', {}).get('value', 1.0):.3f}"
        )
        logger.info("%s: %s (%d queries, encode %.2fs)", name, summary, len(q_ids), enc_secs)
        out[name] = record
    return out


def result_record(name, model, cfg: EvalSettings, sim, index_meta, key, key_digest, config) -> dict:
    """What a result file says about how it was made: the model and backend, the index, the key, the run."""
    return {
        "model": name,
        "backend": lean.backend_name(model.meta) if isinstance(model, lean.LeanEncoder) else "torch",
        "teacher": cfg.teacher_model,
        "similarity": sim,
        "index": cfg.index,
        "doc_index": {k: v for k, v in index_meta.items() if k != "folder"},
        "index_verified": index_meta["index_verified"],
        "result_key": key_digest,
        "key": key,
        "config": config,
    }


def write_trec(path: Path, name: str, q_ids, found) -> None:
    lines = [
        f"{qid} Q0 {did} {rank} {score:.6f} {run_files.slug(name)}"
        for qid in q_ids
        for rank, (did, score) in enumerate(sorted(found[qid].items(), key=lambda x: -x[1]), 1)
    ]
    run_files.write_text(path, "\n".join(lines) + "\n")
