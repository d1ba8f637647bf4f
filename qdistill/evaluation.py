"""One evaluation of students against the teacher's own index: models loaded and checked, the document side
(built here, or the user's), search, relevance metrics, agreement, and result files reused only when made
by the same model, data and settings."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import NamedTuple

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
    vector_teacher,
)
from qdistill.cli import UsageError
from qdistill.eval_data import Dataset, EvalSettings, corpus_text, load_dataset, own_ids
from qdistill.in_domain import mark_training_text
from qdistill.search import cached_faiss, unit

logger = logging.getLogger(__name__)

# 4: results keyed and paired by one definition (result_settings), approximate indexes as served; older ones
# are recomputed
RESULT_SCHEMA = 4


def model_paths(cfg: EvalSettings) -> dict:
    """{name: local folder} of the teacher (first) and each student, in order, each resolved once; a teacher
    known only by its vectors has none (each dataset's log stands in for it)."""
    names = dict.fromkeys([cfg.teacher_model, *cfg.models])
    vectors = cfg.teacher_model if cfg.vectors_only else None
    return {name: None if name == vectors else encoders.resolve_model_path(name, cfg.data_dir) for name in names}


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
    if cfg.vectors_only:  # nothing of the teacher is loaded: each dataset's logged vectors (checked) answer for it
        teacher, checked = datasets[0][0].teacher_log, datasets
    else:
        teacher, _ = encoders.load_model(cfg.teacher_model, device, path=paths[cfg.teacher_model])
        checked = [(ds._replace(doc_index=check_index(cfg, ds, teacher)), q) for ds, q in datasets]
    models = {cfg.teacher_model: teacher}
    for name in names[1:]:
        exported = onnx_export.is_export(paths[name])
        models[name] = (
            lean.LeanEncoder(paths[name]) if exported else encoders.load_model(name, device, path=paths[name])[0]
        )
        dim = models[name].get_embedding_dimension()
        if dim != teacher.get_embedding_dimension() and not (cfg.truncate_dim and dim >= cfg.truncate_dim):
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
    full = teacher.get_embedding_dimension()
    vector_teacher.check_truncation(cfg.truncate_dim, full, f"teacher {cfg.teacher_model}'s vectors")
    # a Matryoshka index holds the first d dimensions: the fresh vectors are cut to it before they are compared
    cut = index.dim if cfg.truncate_dim and index.dim == cfg.truncate_dim < full else None
    index_check.check_shape(index, cut or full, sim, cfg.teacher_model)
    corpus, _ = corpus_text(ds.folder, index)

    def encode(ids):
        with encoders.max_length(teacher, cfg.corpus_max_seq_length):
            texts = [teacher_outputs.doc_text(corpus[i]) for i in ids]
            emb = teacher.encode_document(texts, batch_size=cfg.corpus_batch_size, convert_to_numpy=True)
        return vector_teacher.truncate(emb, cut, sim == "cosine")

    index.verification = index_check.verify(
        index, encode, corpus, sim, cfg.teacher_model, cfg.seed, cfg.allow_partial_index
    )
    return index


def document_side(cfg: EvalSettings, ds: Dataset, teacher, teacher_path, corpus, corpus_file):
    """(DocIndex, its record) of a dataset: the given --doc_index, or the teacher index built here (cached)."""
    if ds.doc_index is not None:
        index = ds.doc_index
        record = {"given": True, "digest": index.digest(), "documents_encoded": 0, **index.verification}
        record.update(kind=index.kind, faiss_type=index.faiss_type, num_docs=len(index), label=index.label)
        record.update(metric=index.metric, served=index.served(), id_set=index.id_set_digest())
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
    digest = teacher_outputs.sha256_texts([json.dumps(meta["key"], sort_keys=True)])[:16]
    if cfg.export_index:
        cosine = encoders.similarity_name(teacher) == "cosine"
        folder = given_index.export_pyserini(Path(cfg.export_index) / ds.name, doc_emb, doc_ids, cosine, digest)
        logger.info("wrote the teacher index of %s in pyserini's layout: %s", ds.name, folder)
    index = given_index.open_npy(Path(meta["folder"]) / "embeddings.npy", doc_ids)
    record = {"given": False, "digest": digest, "documents_encoded": meta["num_docs"], "index_verified": True}
    record.update(label=cfg.index, id_set=given_index.id_set_digest(doc_ids))
    return index, {**record, "folder": meta["folder"], "encode_seconds": meta.get("encode_seconds")}


def evaluate_dataset(cfg: EvalSettings, ds: Dataset, queries, paths, models, sources, config) -> list[dict]:
    """One row per model on one dataset: finished results reused when model, data and settings all match."""
    names, out_root = list(paths), results_root(cfg)
    corpus, corpus_file, queries, qrels, data_stats, collection = load_dataset(ds, queries)
    own = own_ids(ds, queries, corpus, cfg.self_retrieval)
    if ds.teacher_log is not None:  # a teacher known by its vectors: this dataset's log answers for it
        models = {**models, cfg.teacher_model: ds.teacher_log}
    teacher = models[cfg.teacher_model]
    index, index_meta = document_side(cfg, ds, teacher, paths[cfg.teacher_model], corpus, corpus_file)
    sim = encoders.similarity_name(teacher)  # the teacher's own score function, not beir's cosine default
    settings = result_settings(cfg, ds, index, index_meta, sim, own)
    label = settings["index"]
    records, pending = {}, []
    for name in names:
        exported = paths[name] is not None and onnx_export.is_export(paths[name])
        runtime = {"onnxruntime": __import__("onnxruntime").__version__} if exported else {}
        # a teacher known by its vectors is its logged vectors and their ids, by content
        made_by = paths[name] or ds.teacher_log.log.path
        if paths[name] is None:
            runtime["teacher_query_ids"] = ds.teacher_log.log.rows.ids.sha256
        key, key_digest = teacher_outputs.cache_key("retrieval", made_by, {**settings, **runtime})
        path = out_root / run_files.slug(name) / results.result_file(ds.name, label, cfg.truncate_dim)
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
            run_files.write_json(
                out_root / run_files.slug(name) / results.result_file(ds.name, label, cfg.truncate_dim), record
            )
        rows.append({**record, "group": ds.group, "reused": name not in fresh})
    return rows


def result_settings(cfg: EvalSettings, ds: Dataset, index, index_meta: dict, sim: str, own) -> dict:
    """Everything that makes a result what it is: the one definition behind both its key (with the k values
    and the file layout) and the pairing of a student's result with the teacher's (results.made_alike)."""
    import faiss

    approximate = index_meta["label"] != "flat"
    settings = {
        "dataset": ds.digest,
        "split": ds.split,
        "index": index_meta["label"],  # flat (exact), hnsw/ivfpq (built here), given-<type>
        # the index by content (its files' digests and type, a collection's content, or the built index's key)
        "teacher_index": index_meta["digest"],
        "index_verified": index_meta["index_verified"],
        "k_values": cfg.k_values,
        "similarity": sim,
        "own_ids": teacher_outputs.sha256_texts(sorted(own))[:16],
        "faiss": faiss.__version__,
        "schema": RESULT_SCHEMA,
        # an approximate index: its settings as served, and the depth of the second search (@100 metrics)
        "served": index_meta.get("served") or None,
        "deep_search_k": max(cfg.k_values) + 1 if approximate else None,
        "teacher": "vectors only" if cfg.vectors_only else "model",
        "truncate_dim": cfg.truncate_dim,
    }
    if ds.doc_index is None and cfg.index != "flat":  # hnsw/ivfpq built here: with the seed and these settings
        settings.update(index_seed=cfg.index_seed, index_build=search.BUILD[cfg.index])
    return settings


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


class Searched(NamedTuple):
    """One model's queries searched: embeddings, results at the deepest k, the top-10 as served, timings."""

    q_emb: np.ndarray
    found: dict  # k = max(k_values) (+1)
    top10: dict  # k = 10 (+1): an approximate index searched as served for the @10 metrics
    encode_seconds: float
    search_seconds: float


# cut-offs up to this are scored from a search of that depth (k + 1), as served; deeper ones from the deep search
SHALLOW_K = 10


def encode_and_search(model, searcher, q_texts, q_ids, doc_ids, cfg, cosine, approximate: bool) -> Searched:
    """A model's queries encoded and searched. Over an approximate index the @10 metrics come from a search of
    depth 10 (+1), as the index is served: faiss HNSW searches with max(efSearch, k), so one search at k = 101
    would quietly raise efSearch to 101 for every metric."""
    t0 = time.perf_counter()
    q_emb = model.encode_query(q_texts, batch_size=cfg.query_batch_size, convert_to_numpy=True)
    enc_secs = time.perf_counter() - t0
    q_emb = vector_teacher.truncate(q_emb, cfg.truncate_dim, cosine)
    q_emb = unit(q_emb) if cosine else np.asarray(q_emb, np.float32)
    t0 = time.perf_counter()
    found = retrieve(searcher, q_emb, q_ids, doc_ids, max(cfg.k_values))
    top10 = retrieve(searcher, q_emb, q_ids, doc_ids, SHALLOW_K) if approximate else found
    return Searched(q_emb, found, top10, enc_secs, time.perf_counter() - t0)


def score(qrels, run: Searched, k_values, own) -> dict:
    """Relevance metrics and their per-query values (cut-offs up to 10 from the top-10 as served, deeper ones
    from the deep search); nothing without qrels (label-free: agreement only)."""
    if qrels is None:
        return {}
    shallow, deep = [k for k in k_values if k <= SHALLOW_K], [k for k in k_values if k > SHALLOW_K]
    values, dropped = metrics.evaluate(qrels, run.top10, shallow, own)
    per_query = metrics.per_query(qrels, run.top10, shallow, own)
    if deep:
        more, _ = metrics.evaluate(qrels, run.found, deep, own)
        values = {**more, **values}  # MRR@10 from the top-10 as served
        per_query = {**metrics.per_query(qrels, run.found, deep, own), **per_query}
    return {"metrics": values, "own_id_queries": len(own), "identical_ids_dropped": dropped, "per_query": per_query}


def searchers(index: given_index.DocIndex, kind: str, folder, seed: int, cosine: bool, dim: int | None = None):
    """(search, exact search or None): a given index searched as built (approximate ones with exact search over
    their stored vectors beside, for their recall, where they store vectors); else exact search over the vectors
    (chunk by chunk), or an hnsw/ivfpq index built from them once, with exact search beside it. With `dim` below
    the index's (Matryoshka), exact search over the stored rows cut to dim."""

    def served(q, k):
        return index.search(q, k, cosine)

    def exact(q, k):  # over the stored rows of any index that keeps its vectors (chunks: faiss, .npy, Milvus)
        return search.exact_search(q, index.chunks(), min(k, len(index)), cosine)

    if dim is not None and dim < index.dim:
        if kind != "flat" or not index.exact or (index.searched_as_built and index.approximate):
            raise UsageError(
                f"--truncate_dim {dim}: the index {index.path} is searched as built at {index.dim}-d; truncation "
                "searches stored vectors exactly: give an .npy, pyserini or flat faiss index and --index flat"
            )

        def cut(q, k):
            rows = ((s, vector_teacher.truncate(b, dim, cosine)) for s, b in index.chunks())
            return search.exact_search(q, rows, min(k, len(index)), cosine)

        return cut, None
    if index.searched_as_built:
        return served, exact if index.approximate and index.exact else None
    if kind == "flat":
        return served, None
    approx = cached_faiss(np.load(index.path, mmap_mode="r"), kind, folder, seed, normalize=cosine)
    return (lambda q, k: search.search(approx, q, k)), served


def evaluate_models(pending, models, queries, qrels, own, index, index_meta, cfg, sim, config):
    """{model name: record} for the models not evaluated before on this dataset; TREC runs on --save_run."""
    t0 = time.perf_counter()
    cosine = sim == "cosine"  # cosine teachers: inner product over unit vectors
    searcher, exact = searchers(index, cfg.index, index_meta["folder"], cfg.index_seed, cosine, cfg.truncate_dim)
    approximate = index_meta["label"] != "flat"
    doc_ids = index.ids
    build_secs = time.perf_counter() - t0
    q_ids = sorted(queries)
    q_texts = [queries[q] for q in q_ids]
    max_k = max(cfg.k_values)

    def run(model):
        return encode_and_search(model, searcher, q_texts, q_ids, doc_ids, cfg, cosine, approximate)

    # the teacher's own ranking and query embeddings: what each student's agreement is measured against
    teacher_run = run(models[cfg.teacher_model])
    t_emb = teacher_run.q_emb
    t_top = metrics.top_ids(metrics.drop_own_ids(qrels, teacher_run.top10, own)[0], 10)
    out = {}
    for name, path, key, key_digest in pending:
        model = models[name]
        searched = teacher_run if name == cfg.teacher_model else run(model)
        q_emb, found, enc_secs, search_secs = (
            searched.q_emb,
            searched.found,
            searched.encode_seconds,
            searched.search_seconds,
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
        record.update(score(qrels, searched, cfg.k_values, own))
        if name != cfg.teacher_model:
            s_top = metrics.top_ids(metrics.drop_own_ids(qrels, searched.top10, own)[0], 10)
            agree = metrics.agreement(s_top, t_top, q_emb, t_emb, q_ids, cfg.seed)
            record["agreement"] = agree["summary"]
            record.setdefault("per_query", {}).update(agree["per_query"])
        if exact is not None:  # each cut-off against an approximate search of its own depth (10 or the deepest k)
            exact_ids = exact(q_emb, max_k)[1]
            approx = {k: searcher(q_emb, SHALLOW_K if k <= SHALLOW_K else max_k)[1] for k in (10, 100) if k <= max_k}
            record["approx_recall"] = {f"@{k}": metrics.overlap_at_k(exact_ids, a, k) for k, a in approx.items()}
        if approximate:
            record["served"] = {"settings": index_meta.get("served"), "k@10": SHALLOW_K + 1, "k_deep": max_k + 1}
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
        "backend": backend(model),
        "teacher": cfg.teacher_model,
        "similarity": sim,
        "index": cfg.index,
        "doc_index": {k: v for k, v in index_meta.items() if k != "folder"},
        "index_verified": index_meta["index_verified"],
        "result_key": key_digest,
        "key": key,
        "config": config,
    }


def backend(model) -> str:
    if isinstance(model, vector_teacher.VectorTeacher):
        return "logged vectors"
    return lean.backend_name(model.meta) if isinstance(model, lean.LeanEncoder) else "torch"


def write_trec(path: Path, name: str, q_ids, found) -> None:
    lines = [
        f"{qid} Q0 {did} {rank} {score:.6f} {run_files.slug(name)}"
        for qid in q_ids
        for rank, (did, score) in enumerate(sorted(found[qid].items(), key=lambda x: -x[1]), 1)
    ]
    run_files.write_text(path, "\n".join(lines) + "\n")
