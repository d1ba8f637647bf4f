"""Score student query encoders against the teacher's own cached document index: with relevance labels (BEIR
qrels: nDCG@10 retention with 95% intervals) and without them (agreement with the teacher's own ranking).

The teacher is always evaluated too (its query encoder against its index), so each student gets a
retention = student nDCG@10 / teacher nDCG@10 per dataset and the mean of those ratios, each with a paired
bootstrap interval and a paired t-test (stats.py), and its agreement with the teacher on the same queries:
overlap@10, the share of teacher top-1s in the student's top-10, and the cosine to the teacher's query embedding.

    python evaluate_retrieval.py --teacher_model sentence-transformers/all-MiniLM-L6-v2 \\
        --models output/all-MiniLM-L6-v2-L0-5/final --datasets scifact nfcorpus fiqa
    python evaluate_retrieval.py --teacher_model T --models S \\
        --datasets $DATA_DIR/scifact $DATA_DIR/cranfield --index hnsw
    # your collection, no relevance labels: a query log, or pseudo-queries sampled from the documents
    python evaluate_retrieval.py --teacher_model T --models S --datasets my_docs.tsv --queries my_log.tsv
    python evaluate_retrieval.py --teacher_model T --models S --datasets $DATA_DIR/nfcorpus --label_free \\
        --pseudo_queries 500
    # the teacher index you already have, as it is (nothing re-encoded; 64 documents re-encoded to check it)
    python evaluate_retrieval.py --teacher_model T --models S --datasets my_beir_folder --doc_index my_pyserini_index
    python evaluate_retrieval.py --teacher_model T --models S --datasets my_beir_folder \\
        --doc_index embeddings.npy --doc_ids docids.txt

Outputs: output/index/<teacher>/<dataset>/ (cached teacher embeddings), one JSON per (model, dataset) in
output/retrieval/<teacher>/<model>/<dataset>.json (with per-query values), and the table
output/retrieval/<teacher>/results.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

import cache
import common
import data
import doc_index
import loading
import metrics
import serving
import stats
import training_text
from common import UsageError, positive_int
from metrics import evaluate  # noqa: F401 - part of this script's interface (tests, notebooks)
from search import cached_faiss, check_index_size, search, unit

logger = logging.getLogger("qdistill.retrieval")
RESULT_SCHEMA = 2  # 2: per-query values and agreement in every result file; older results are recomputed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("--teacher_model", default=common.PAPER_TEACHER, help="HF id or folder; its document index is searched")
    add("--models", nargs="*", default=[], help="student models (HF ids or folders such as output/RUN/final)")
    add("--datasets", nargs="+", required=True, help="BEIR names or folders; without qrels also a collection tsv")
    add("--data_dir", default=common.DATA_DIR, help="where BEIR names are looked for / downloaded to")
    add("--split", default=None, help="qrels split (default: test; dev for msmarco)")
    add("--label_free", action="store_true", help="ignore qrels: agreement with the teacher only")
    add("--queries", default=None, help="queries of label-free datasets: a file or log (id<TAB>text or one a line)")
    add(
        "--pseudo_queries",
        type=positive_int,
        default=None,
        help="label-free datasets without queries: N pseudo-queries sampled from the documents",
    )
    add("--k_values", type=positive_int, nargs="+", default=[1, 3, 5, 10, 100], help="must include 10")
    add("--corpus_max_seq_length", type=positive_int, default=None, help="default: the teacher's max_seq_length")
    add("--corpus_batch_size", type=positive_int, default=32)
    add("--query_batch_size", type=positive_int, default=128)
    add("--encode_devices", nargs="+", default=None, help="several devices: multi-process corpus encoding")
    add("--index", default="flat", choices=["flat", "hnsw", "ivfpq"], help="flat = exact inner product")
    add(
        "--doc_index",
        nargs="+",
        default=None,
        help="the teacher's document index you have, one per dataset: a pyserini folder (index + docid), or a\n"
        "faiss file or embeddings .npy with --doc_ids; no document is encoded beyond a 64-document check",
    )
    add("--doc_ids", nargs="+", default=None, help="each --doc_index file's ids (one a line; - for a pyserini folder)")
    add("--export_index", default=None, help="also write each teacher index built here as DIR/<dataset>/{index,docid}")
    add("--output_path", default="output")
    add("--save_run", action="store_true", help="also write a TREC run file per (model, dataset)")
    add(
        "--overwrite_output_dir",
        "--overwrite",
        dest="overwrite",
        action="store_true",
        help="re-evaluate finished (model, dataset) pairs",
    )
    add("--device", default="auto")
    add("--seed", type=int, default=42)
    add("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    if 10 not in args.k_values:
        p.error("--k_values must include 10: nDCG@10 is the reported metric and the base of retention")
    if args.queries and args.pseudo_queries:
        p.error("--queries and --pseudo_queries are two query sources; give one")
    if args.doc_ids and not args.doc_index:
        p.error("--doc_ids goes with --doc_index (the index whose rows they name)")
    if args.doc_ids and len(args.doc_ids) != len(args.doc_index):
        p.error(f"--doc_ids lists {len(args.doc_ids)} files, --doc_index {len(args.doc_index)}; one each (- for none)")
    if args.export_index and args.doc_index:
        p.error("--export_index writes indexes this script builds; with --doc_index it builds none")
    args.k_values = sorted(set(args.k_values))
    return args


# ----------------------------------------------------------------------------- datasets


class Dataset(NamedTuple):
    name: str
    folder: Path  # the BEIR folder, or the collection tsv of a label-free dataset
    group: str | None
    split: str | None  # None: label-free
    digest: str  # corpus, queries and qrels content
    corpus_sha256: str | None  # None: no corpus text (the documents are in a given --doc_index)
    queries_sha256: str
    doc_index: doc_index.DocIndex | None = None  # the user's index, searched instead of one built here


def labelled_dataset(name, folder: Path, group, split, index=None) -> tuple[Dataset, int]:
    """(dataset, documents) of a BEIR folder with qrels, every file read and checked (malformed files fail here,
    not after indexing); with a given index the corpus is optional and the qrels' documents must be in it."""
    corpus, _, qrels, _ = data.load_beir(folder, split, corpus_optional=index is not None)
    hashes = [cache.sha256_file(f) if f.is_file() else None for f in data.check_beir(folder, split, corpus=False)]
    if index is not None:
        doc_index.check_qrels(index, qrels)
    digest = cache.sha256_texts(h or "-" for h in hashes)[:16]
    return Dataset(name, folder, group, split, digest, hashes[0], hashes[1], index), len(index or corpus)


def corpus_text(path: Path, index) -> tuple[dict | None, Path | None]:
    """(corpus, its file) of a dataset; (None, None) where a given index stands in for absent documents."""
    has_text = path.is_file() or (path / "corpus.jsonl").is_file()
    return data.load_corpus(path) if has_text or index is None else (None, None)


def label_free_queries(args, folder: Path, corpus: dict, trained) -> dict[str, str]:
    """{id: text}: --queries, else the folder's queries.jsonl, else --pseudo_queries N sampled from the documents
    (seeded; never a text any evaluated student trained on)."""
    if args.queries:
        return data.read_queries(args.queries)
    if folder.is_dir() and (folder / "queries.jsonl").is_file() and not args.pseudo_queries:
        return data.read_queries(folder / "queries.jsonl")
    if not args.pseudo_queries:
        raise UsageError(
            f"{folder} has no relevance labels and no queries; pass --queries FILE (a query log) or --pseudo_queries N"
        )
    if corpus is None:
        raise UsageError(f"--pseudo_queries samples document text, and {folder} has none; pass --queries FILE")
    spans = training_text.sample_spans(corpus, 2 * args.pseudo_queries, list(range(3, 13)), args.seed + 5)
    seen = trained()  # every evaluated student's training-text hashes
    spans = [s for s in spans if data.text_hash(s) not in seen][: args.pseudo_queries]
    return {f"pseudo-{i}": s for i, s in enumerate(spans)}


def label_free_dataset(args, name, path: Path, group, trained, index=None) -> tuple[Dataset, dict, int]:
    corpus, file = corpus_text(path, index)
    queries = {q: t for q, t in label_free_queries(args, path, corpus, trained).items() if t.strip()}
    if not queries:
        raise UsageError(f"no queries for {name}; pass --queries FILE or --pseudo_queries N")
    q_sha = cache.sha256_texts(x for q in sorted(queries) for x in (q, queries[q]))
    corpus_sha = cache.sha256_file(file) if file else None
    # its own result name: never the labelled results of the same folder, nor the other query source's
    name = f"{name}-{'pseudo' if args.pseudo_queries else 'label-free'}"
    digest = cache.sha256_texts([corpus_sha or "-", q_sha])[:16]
    return Dataset(name, path, group, None, digest, corpus_sha, q_sha, index), queries, len(index or corpus)


def load_dataset(ds: Dataset, queries=None):
    """(corpus or None, corpus file or None, queries, qrels or None, stats)."""
    if ds.split is None:
        corpus, file = corpus_text(ds.folder, ds.doc_index)
        return corpus, file, queries, None, {"label_free": True, "num_queries": len(queries)}
    corpus, queries, qrels, data_stats = data.load_beir(ds.folder, ds.split, corpus_optional=ds.doc_index is not None)
    return corpus, ds.folder / "corpus.jsonl", queries, qrels, data_stats


def given_indexes(args, count: int) -> list:
    """One opened --doc_index per dataset (None each without the flag), read and checked for shape."""
    if not args.doc_index:
        return [None] * count
    if len(args.doc_index) != count:
        raise UsageError(
            f"--doc_index lists {len(args.doc_index)} indexes for {count} datasets; give one per dataset, in order"
        )
    ids = [None if i in (None, "-") else i for i in (args.doc_ids or [None] * count)]
    opened = [doc_index.open_index(spec, i) for spec, i in zip(args.doc_index, ids)]
    for spec, index in zip(args.doc_index, opened):
        if index.searched_as_built and args.index != "flat":
            raise UsageError(f"--index {args.index}: the faiss index {spec} is searched as it was built; drop --index")
    return opened


def check_datasets(args, trained) -> list[tuple[Dataset, dict | None]]:
    """Every dataset read and checked before the teacher loads or any index is built. trained() gives the
    training-text hashes that pseudo-queries must avoid (read only when pseudo-queries are sampled)."""
    out = []
    expanded = data.expand_datasets(args.datasets, args.data_dir, allow_files=True)
    for (name, path, group), index in zip(expanded, given_indexes(args, len(expanded))):
        split = args.split or ("dev" if path.name == "msmarco" else "test")
        has_qrels = path.is_dir() and (path / "qrels" / f"{split}.tsv").is_file()
        if has_qrels and not args.label_free:
            ds, num_docs = labelled_dataset(name, path, group, split, index)
            out.append((ds, None))
        elif args.label_free or args.queries or args.pseudo_queries or path.is_file():
            ds, queries, num_docs = label_free_dataset(args, name, path, group, trained, index)
            out.append((ds, queries))
        else:
            data.check_beir(path, split, corpus=index is None)  # the one-line error naming the missing file
        check_index_size(args.index, num_docs, name)
    return out


# ----------------------------------------------------------------------------- in-domain marking


def in_domain(sources, folder: Path, corpus_sha256, queries_sha256, overlap: int, index_digest=None) -> bool:
    """A collection is in-domain for a student that trained on its documents (their text, or the given index it
    is evaluated against, whose vectors served score terms), on its query file (same content, or a file inside
    its folder), or on any of its evaluation queries (overlap: the leak guard's count)."""
    if not sources:
        return False
    corpora = sources.get("corpora", [])
    documents = {c.get("corpus_sha256") for c in corpora if c.get("texts", 1)}
    documents |= {c.get("index_digest") for c in corpora}
    documents.discard(None)
    if overlap or corpus_sha256 in documents or index_digest in documents:
        return True
    for f in sources.get("query_files", []):
        record = f if isinstance(f, dict) else {"path": f}  # records written before content hashes: paths only
        path = Path(record["path"]).resolve()
        if record.get("sha256") == queries_sha256 or (folder.is_dir() and path.is_relative_to(folder.resolve())):
            return True
    return False


def training_overlap(sources: dict | None, query_texts) -> int:
    """How many evaluation queries (normalised text) the student trained on: the leak guard."""
    trained = set((sources or {}).get("text_hashes", []))
    return sum(data.text_hash(t) in trained for t in query_texts) if trained else 0


# ----------------------------------------------------------------------------- the table


def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def retention_cis(rows: list[dict], teacher: str, seed: int) -> None:
    """Per-dataset retention of nDCG@10 with its interval and paired test, into each student row (in place)."""
    by = {(r["model"], r["dataset"]): r for r in rows}
    for r in rows:
        t = by.get((teacher, r["dataset"]))
        if r["model"] == teacher or not t or "per_query" not in r or "per_query" not in t:
            continue
        r["retention"] = {
            m: stats.retention_ci(r["per_query"][m], t["per_query"][m], seed)
            for m in ("NDCG@10", "Recall@100")
            if m in r["per_query"]
        }


def results_table(rows: list[dict], datasets: list[str], teacher: str, seed: int = 0) -> str:
    """Markdown: rows = models, columns = nDCG@10 per dataset (retention [95% interval]; * = the student trained
    on that collection's text), the mean retention of nDCG@10 and R@100 over zero-shot and in-domain datasets
    apart (never mixed), and the mean overlap@10 with the teacher; label-free datasets show overlap@10."""
    by = {(r["model"], r["dataset"]): r for r in rows}
    kinds = ("zero-shot", "in-domain")
    head = [
        "model",
        *[f"{d} nDCG@10 (ret.)" for d in datasets],
        *[f"{k} ret. {m}" for m in ("nDCG@10", "R@100") for k in kinds],
        "overlap@10 w/ teacher",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in dict.fromkeys(r["model"] for r in rows):
        cells, pairs, ratios = [m + (" (teacher)" if m == teacher else "")], {}, {}
        overlaps = []
        for d in datasets:
            r, t = by.get((m, d)), by.get((teacher, d))
            if r is None:
                cells.append("-")
                continue
            agree = r.get("agreement", {}).get("overlap@10")
            if agree:
                overlaps.append(agree["value"])
            if "metrics" not in r:  # label-free: agreement only
                cells.append(f"overlap@10 {stats.fmt_ci(agree, 2)}" if agree else "-")
                continue
            kind = "in-domain" if r.get("in_domain_text") else "zero-shot"
            for x, k in (("n", "NDCG@10"), ("r", "Recall@100")):
                if t and t["metrics"].get(k) and m != teacher:
                    ratios.setdefault((kind, x), []).append(r["metrics"][k] / t["metrics"][k])
                    if "per_query" in r and "per_query" in t and k in r["per_query"]:
                        pairs.setdefault((kind, x), []).append((r["per_query"][k], t["per_query"][k]))
            mark = "*" if kind == "in-domain" else ""
            ret = r.get("retention", {}).get("NDCG@10") or (
                {"value": r.get("retention_ndcg@10")} if m != teacher else None
            )
            cells.append(
                f"{fmt(r['metrics']['NDCG@10'])} ({stats.fmt_ci(ret, 2)}){mark}"
                if ret
                else fmt(r["metrics"]["NDCG@10"])
            )
        for x in ("n", "r"):
            for k in kinds:
                if (k, x) in pairs and len(pairs[(k, x)]) == len(ratios[(k, x)]):
                    cells.append(stats.fmt_ci(stats.mean_retention_ci(pairs[(k, x)], seed)))
                else:  # grouped datasets (CQADupStack) and older result files: the mean alone
                    cells.append(fmt(np.mean(ratios[(k, x)])) if ratios.get((k, x)) else "-")
        cells.append(fmt(np.mean(overlaps)) if overlaps and m != teacher else "-")
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "\n\n\\* the student trained on text of this collection (in-domain text). Brackets: 95% paired bootstrap "
        "intervals over queries (stats.py).\n"
    )
    return "\n".join(lines) + note


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


# ----------------------------------------------------------------------------- main


def load_models(args, names, paths, device, datasets):
    """{name: model}: the teacher and each student (an ONNX Runtime export through its lean query path). Each
    given --doc_index is checked against the teacher before any student loads."""
    for name in names[1:]:  # a damaged export fails here, before the teacher loads
        if serving.is_export(paths[name]):
            serving.check_export(paths[name])
    teacher, _ = loading.load_model(args.teacher_model, device, path=paths[args.teacher_model])
    checked = [(ds._replace(doc_index=check_index(args, ds, teacher)), q) for ds, q in datasets]
    models = {args.teacher_model: teacher}
    for name in names[1:]:
        exported = serving.is_export(paths[name])
        models[name] = (
            serving.LeanEncoder(paths[name]) if exported else loading.load_model(name, device, paths[name])[0]
        )
        dim = models[name].get_embedding_dimension()
        if dim != teacher.get_embedding_dimension():
            raise UsageError(
                f"{name} gives {dim}-d embeddings but the teacher index is {teacher.get_embedding_dimension()}-d; "
                "train it with distillation.py against this teacher"
            )
    return models, checked


def check_index(args, ds: Dataset, teacher):
    """The dataset's given index, checked to belong to the teacher (doc_index.verify on a seeded sample of its
    documents, encoded as the teacher's own index would be); its record is kept on the index."""
    index = ds.doc_index
    if index is None:
        return None
    sim = loading.similarity_name(teacher)
    doc_index.check_shape(index, teacher.get_embedding_dimension(), sim, args.teacher_model)
    corpus, _ = corpus_text(ds.folder, index)

    def encode(ids):
        with loading.max_length(teacher, args.corpus_max_seq_length):
            texts = [cache.doc_text(corpus[i]) for i in ids]
            return teacher.encode_document(texts, batch_size=args.corpus_batch_size, convert_to_numpy=True)

    index.verification = doc_index.verify(index, encode, corpus, sim, args.teacher_model, args.seed)
    return index


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.start_run(args.log_level, args.seed, args.output_path)
    device = common.pick_device(args.device)
    config = common.run_info(vars(args), device, argv, __file__)
    names = list(dict.fromkeys([args.teacher_model, *args.models]))
    paths = {}

    def trained():
        return {h for n in names for h in (common.text_sources(resolve(n)) or {}).get("text_hashes", [])}

    def resolve(name):
        paths[name] = paths.get(name) or loading.resolve_model_path(name, args.data_dir)
        return paths[name]

    datasets = check_datasets(args, trained)  # first: a bad dataset is named before any model is looked up
    sources = {name: common.text_sources(resolve(name)) for name in names}
    models, datasets = load_models(args, names, paths, device, datasets)
    out_root = Path(args.output_path) / "retrieval" / common.slug(args.teacher_model)
    rows = []
    for ds, label_free_queries_ in datasets:
        rows += evaluate_dataset(args, ds, label_free_queries_, names, paths, models, sources, out_root, config)
    retention_cis(rows, args.teacher_model, args.seed)
    rows = group_rows(rows)
    shown = list(dict.fromkeys(r["dataset"] for r in rows))
    table = results_table(rows, shown, args.teacher_model, args.seed)
    common.write_text(out_root / "results.md", table)
    print(table)
    return {"rows": rows, "table": table}


def document_side(args, ds: Dataset, teacher, teacher_path, corpus, corpus_file):
    """(DocIndex, its record) of a dataset: the given --doc_index, or the teacher index built here (cached)."""
    if ds.doc_index is not None:
        index = ds.doc_index
        record = {"given": True, "digest": index.digest(), "documents_encoded": 0, **index.verification}
        record.update(kind=index.kind, faiss_type=index.faiss_type, num_docs=len(index))
        return index, {**record, "folder": Path(args.output_path) / "index" / "given" / index.digest()}
    doc_emb, doc_ids, meta = cache.teacher_index(
        teacher,
        args.teacher_model,
        teacher_path,
        corpus,
        corpus_file,
        args.output_path,
        args.corpus_max_seq_length,
        args.corpus_batch_size,
        devices=args.encode_devices,
    )
    if args.export_index:
        cosine = loading.similarity_name(teacher) == "cosine"
        folder = doc_index.write_pyserini(Path(args.export_index) / ds.name, doc_emb, doc_ids, cosine)
        logger.info("wrote the teacher index of %s in pyserini's layout: %s", ds.name, folder)
    index = doc_index.open_npy(Path(meta["folder"]) / "embeddings.npy", doc_ids)
    digest = cache.sha256_texts([json.dumps(meta["key"], sort_keys=True)])[:16]
    record = {"given": False, "digest": digest, "documents_encoded": meta["num_docs"], "index_verified": True}
    return index, {**record, "folder": meta["folder"], "encode_seconds": meta.get("encode_seconds")}


def evaluate_dataset(args, ds: Dataset, queries, names, paths, models, sources, out_root, config) -> list[dict]:
    """One row per model on one dataset: finished results reused when model, data and settings all match."""
    corpus, corpus_file, queries, qrels, data_stats = load_dataset(ds, queries)
    teacher = models[args.teacher_model]
    index, index_meta = document_side(args, ds, teacher, paths[args.teacher_model], corpus, corpus_file)
    sim = loading.similarity_name(teacher)  # the teacher's own score function, not beir's cosine default
    settings = {
        "dataset": ds.digest,
        "split": ds.split,
        "index": args.index,
        # the index by content (its files' digests and faiss type, or the built index's key), never by path
        "teacher_index": index_meta["digest"],
        "index_verified": index_meta["index_verified"],
        "k_values": args.k_values,
        "similarity": sim,
        "faiss": __import__("faiss").__version__,
        "schema": RESULT_SCHEMA,
        **({"seed": args.seed} if args.index != "flat" else {}),  # hnsw/ivfpq are built with the seed
    }
    records, pending = {}, []
    for name in names:
        runtime = {"onnxruntime": __import__("onnxruntime").__version__} if serving.is_export(paths[name]) else {}
        key, key_digest = cache.cache_key("retrieval", paths[name], {**settings, **runtime})
        path = out_root / common.slug(name) / f"{ds.name}.json"
        old = json.loads(path.read_text()) if path.exists() and not args.overwrite else {}
        if old.get("result_key") == key_digest:
            logger.info("%s on %s: finished earlier with the same model, data and settings, reusing", name, ds.name)
            records[name] = old
        else:
            pending.append((name, path, key, key_digest))
    if pending:
        records.update(evaluate_models(pending, models, queries, qrels, index, index_meta, args, sim, config))
    rows, fresh = [], {p[0] for p in pending}
    for name in names:
        record = {**records[name], "dataset": ds.name, "dataset_path": str(ds.folder), "split": ds.split}
        if name != args.teacher_model:
            mark_training_text(record, records[args.teacher_model], sources[name], ds, queries)
        record["data_stats"] = data_stats
        if name in fresh:  # fresh results are written; reused ones stay as they are
            common.write_json(out_root / common.slug(name) / f"{ds.name}.json", record)
        rows.append({**record, "group": ds.group, "reused": name not in fresh})
    return rows


def mark_training_text(record: dict, teacher: dict, sources: dict | None, ds: Dataset, queries: dict) -> None:
    """A student's retention, its training-text record, the leak guard's count and the in-domain mark (in place)."""
    teacher_ndcg = teacher.get("metrics", {}).get("NDCG@10")
    if "metrics" in record:
        record["retention_ndcg@10"] = record["metrics"]["NDCG@10"] / teacher_ndcg if teacher_ndcg else None
    overlap = training_overlap(sources, queries.values())
    if overlap:
        logger.warning(
            "%s trained on %d of the %d %s queries: in-domain, not zero-shot",
            record["model"],
            overlap,
            len(queries),
            ds.name,
        )
    record["training_text_sources"] = {k: v for k, v in (sources or {}).items() if k != "text_hashes"}
    record["training_query_overlap"] = overlap
    given = record.get("doc_index", {})
    digest = given.get("digest") if given.get("given") else None
    record["in_domain_text"] = in_domain(sources, ds.folder, ds.corpus_sha256, ds.queries_sha256, overlap, digest)
    record["training_text"] = "in-domain" if record["in_domain_text"] else "zero-shot"


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


def encode_and_search(model, searcher, q_texts, q_ids, doc_ids, args, cosine):
    """(query embeddings, results with own ids dropped where unjudged, encode seconds, search seconds)."""
    t0 = time.perf_counter()
    q_emb = model.encode_query(q_texts, batch_size=args.query_batch_size, convert_to_numpy=True)
    enc_secs = time.perf_counter() - t0
    q_emb = unit(q_emb) if cosine else np.asarray(q_emb, np.float32)
    t0 = time.perf_counter()
    results = retrieve(searcher, q_emb, q_ids, doc_ids, max(args.k_values))
    return q_emb, results, enc_secs, time.perf_counter() - t0


def score(qrels, results, k_values) -> dict:
    """Relevance metrics and their per-query values; nothing without qrels (label-free: agreement only)."""
    if qrels is None:
        return {}
    values, dropped = metrics.evaluate(qrels, results, k_values)
    return {
        "metrics": values,
        "identical_ids_dropped": dropped,
        "per_query": metrics.per_query(qrels, results, k_values),
    }


def searchers(index: doc_index.DocIndex, kind: str, folder, seed: int, cosine: bool):
    """(search, exact search or None): a given faiss file searched as built; else exact search over the vectors
    (chunk by chunk), or an hnsw/ivfpq index built from them once, with exact search beside it for its recall."""

    def exact(q, k):
        return index.search(q, k, cosine)

    if kind == "flat" or index.searched_as_built:
        return exact, None
    approx = cached_faiss(np.load(index.path, mmap_mode="r"), kind, folder, seed, normalize=cosine)
    return (lambda q, k: search(approx, q, k)), exact


def evaluate_models(pending, models, queries, qrels, index, index_meta, args, sim, config):
    """{model name: record} for the models not evaluated before on this dataset; TREC runs on --save_run."""
    t0 = time.perf_counter()
    cosine = sim == "cosine"  # cosine teachers: inner product over unit vectors
    searcher, exact = searchers(index, args.index, index_meta["folder"], args.seed, cosine)
    doc_ids = index.ids
    build_secs = time.perf_counter() - t0
    q_ids = sorted(queries)
    q_texts = [queries[q] for q in q_ids]
    max_k = max(args.k_values)
    # the teacher's own ranking and query embeddings: what each student's agreement is measured against
    teacher_run = encode_and_search(models[args.teacher_model], searcher, q_texts, q_ids, doc_ids, args, cosine)
    t_emb, t_results = teacher_run[:2]
    t_top = metrics.top_ids(metrics.drop_own_ids(qrels, t_results)[0], 10)
    out = {}
    for name, path, key, key_digest in pending:
        model = models[name]
        q_emb, results, enc_secs, search_secs = (
            teacher_run
            if name == args.teacher_model
            else encode_and_search(model, searcher, q_texts, q_ids, doc_ids, args, cosine)
        )
        record = {
            "model": name,
            "backend": serving.backend_name(model.meta) if isinstance(model, serving.LeanEncoder) else "torch",
            "teacher": args.teacher_model,
            "similarity": sim,
            "index": args.index,
            "doc_index": {k: v for k, v in index_meta.items() if k != "folder"},
            "index_verified": index_meta["index_verified"],
            "result_key": key_digest,
            "key": key,
            "num_queries": len(q_ids),
            "num_docs": len(doc_ids),
            "timings": {
                "query_encode_seconds": round(enc_secs, 3),
                "search_seconds": round(search_secs, 4),
                "queries_per_second": round(len(q_ids) / enc_secs, 1),
                "index_build_seconds": round(build_secs, 3),
                "corpus_encode_seconds": index_meta.get("encode_seconds"),
                "documents_encoded": index_meta["documents_encoded"],
            },
            "config": config,
        }
        record.update(score(qrels, results, args.k_values))
        if name != args.teacher_model:
            s_top = metrics.top_ids(metrics.drop_own_ids(qrels, results)[0], 10)
            agree = metrics.agreement(s_top, t_top, q_emb, t_emb, q_ids, args.seed)
            record["agreement"] = agree["summary"]
            record.setdefault("per_query", {}).update(agree["per_query"])
        if exact is not None:
            exact_ids, approx_ids = exact(q_emb, max_k)[1], searcher(q_emb, max_k)[1]
            record["approx_recall"] = {
                f"@{k}": metrics.overlap_at_k(exact_ids, approx_ids, k) for k in (10, 100) if k <= max_k
            }
        if args.save_run:
            write_trec(path.with_suffix(".trec"), name, q_ids, results)
        summary = (
            f"nDCG@10 {record['metrics']['NDCG@10']:.4f}"
            if qrels is not None
            else f"overlap@10 {record.get('agreement', {}).get('overlap@10', {}).get('value', 1.0):.3f}"
        )
        logger.info("%s: %s (%d queries, encode %.2fs)", name, summary, len(q_ids), enc_secs)
        out[name] = record
    return out


def write_trec(path: Path, name: str, q_ids, results) -> None:
    lines = [
        f"{qid} Q0 {did} {rank} {score:.6f} {common.slug(name)}"
        for qid in q_ids
        for rank, (did, score) in enumerate(sorted(results[qid].items(), key=lambda x: -x[1]), 1)
    ]
    common.write_text(path, "\n".join(lines) + "\n")


if __name__ == "__main__":
    common.cli(main)
