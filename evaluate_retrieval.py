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
output/retrieval/<teacher>/<model>/<dataset>.json (<dataset>.hnsw.json for --index hnsw; with per-query values
and what made the result), and the tables (labelled; label-free) in output/retrieval/<teacher>/results.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

import serving
from qdistill import (
    cli,
    data,
    encoders,
    given_index,
    metrics,
    results,
    run_files,
    search,
    stats,
    teacher_outputs,
    training_text,
)
from qdistill.cli import UsageError, positive_int
from qdistill.metrics import evaluate  # noqa: F401 - part of this script's interface (tests, notebooks)
from qdistill.search import cached_faiss, check_index_size, unit

logger = logging.getLogger("qdistill.retrieval")
# 3: what made the result (made_alike), leaked queries and own ids in every result file; older ones are recomputed
RESULT_SCHEMA = 3
SELF_RETRIEVAL = {"arguana", "quora"}  # BEIR collections whose queries are documents (beir's ignore_identical_ids)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("--teacher_model", default=cli.PAPER_TEACHER, help="HF id or folder; its document index is searched")
    add("--models", nargs="*", default=[], help="student models (HF ids or folders such as output/RUN/final)")
    add("--datasets", nargs="+", required=True, help="BEIR names or folders; without qrels also a collection tsv")
    add("--data_dir", default=cli.DATA_DIR, help="where BEIR names are looked for / downloaded to")
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
    add(
        "--self_retrieval",
        action="store_true",
        help="the datasets' queries are documents (as in ArguAna, Quora): drop each query's own id from its\n"
        "results (elsewhere only where the document of that id has the query's text)",
    )
    add("--device", default="auto")
    add("--seed", type=cli.non_negative_int, default=0, help="bootstrap intervals and pseudo-query sampling")
    add("--index_seed", type=cli.non_negative_int, default=42, help="hnsw/ivfpq index builds")
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
    doc_index: given_index.DocIndex | None = None  # the user's index, searched instead of one built here


def labelled_dataset(name, folder: Path, group, split, index=None) -> tuple[Dataset, int]:
    """(dataset, documents) of a BEIR folder with qrels, every file read and checked (malformed files fail here,
    not after indexing); with a given index the corpus is optional and the qrels' documents must be in it."""
    corpus, _, qrels, _ = data.load_beir(folder, split, corpus_optional=index is not None)
    hashes = [
        teacher_outputs.sha256_file(f) if f.is_file() else None for f in data.check_beir(folder, split, corpus=False)
    ]
    if index is not None:
        given_index.check_qrels(index, qrels)
    digest = teacher_outputs.sha256_texts(h or "-" for h in hashes)[:16]
    return Dataset(name, folder, group, split, digest, hashes[0], hashes[1], index), len(index or corpus)


def corpus_text(path: Path, index) -> tuple[dict | None, Path | None]:
    """(corpus, its file) of a dataset; (None, None) where a given index stands in for absent documents."""
    has_text = path.is_file() or (path / "corpus.jsonl").is_file()
    return data.load_corpus(path) if has_text or index is None else (None, None)


def label_free_queries(args, folder: Path, corpus: dict) -> dict[str, str]:
    """{id: text}: --queries, else the folder's queries.jsonl, else --pseudo_queries N sampled from the documents:
    a function of (collection, N, seed) alone; a student that trained on some of them has those left out of its
    agreement and counted (leaked queries), as on any query set."""
    if args.queries:
        return data.read_queries(cli.check_file(args.queries, "--queries", "pass a query log (id<TAB>text)"))
    if folder.is_dir() and (folder / "queries.jsonl").is_file() and not args.pseudo_queries:
        return data.read_queries(folder / "queries.jsonl")
    if not args.pseudo_queries:
        raise UsageError(
            f"{folder} has no relevance labels and no queries; pass --queries FILE (a query log) or --pseudo_queries N"
        )
    if corpus is None:
        raise UsageError(f"--pseudo_queries samples document text, and {folder} has none; pass --queries FILE")
    spans = training_text.sample_spans(corpus, args.pseudo_queries, list(range(3, 13)), args.seed + 5)
    if len(spans) < args.pseudo_queries:
        logger.warning(
            "%s: only %d distinct pseudo-queries in its %d documents (%d asked for); evaluating those",
            folder.name,
            len(spans),
            len(corpus),
            args.pseudo_queries,
        )
    return {f"pseudo-{i}": s for i, s in enumerate(spans)}


def label_free_dataset(args, name, path: Path, group, index=None) -> tuple[Dataset, dict, int]:
    corpus, file = corpus_text(path, index)
    queries = {q: t for q, t in label_free_queries(args, path, corpus).items() if t.strip()}
    if not queries:
        given = args.queries or (path / "queries.jsonl" if path.is_dir() and not args.pseudo_queries else None)
        fix = f"{given} holds no non-empty query" if given else "no pseudo-query could be sampled from its documents"
        raise UsageError(f"no queries for {name}: {fix}; pass a query log with --queries FILE or --pseudo_queries N")
    q_sha = teacher_outputs.sha256_texts(x for q in sorted(queries) for x in (q, queries[q]))
    corpus_sha = teacher_outputs.sha256_file(file) if file else None
    # its own result name: never the labelled results of the same folder, nor another query source's
    name = f"{name}-label-free" if not args.pseudo_queries else pseudo_name(name, args.pseudo_queries, args.seed)
    digest = teacher_outputs.sha256_texts([corpus_sha or "-", q_sha])[:16]
    return Dataset(name, path, group, None, digest, corpus_sha, q_sha, index), queries, len(index or corpus)


def pseudo_name(name: str, n: int, seed: int) -> str:
    """The result name of N pseudo-queries sampled with a seed: each (N, seed) its own query set and file."""
    return f"{name}-pseudo{n}" + (f"-seed{seed}" if seed else "")


def load_dataset(ds: Dataset, queries=None):
    """(corpus or None, corpus file or None, queries, qrels or None, stats, every query of the collection)."""
    if ds.split is None:
        corpus, file = corpus_text(ds.folder, ds.doc_index)
        return corpus, file, queries, None, {"label_free": True, "num_queries": len(queries)}, queries
    corpus, queries, qrels, data_stats = data.load_beir(ds.folder, ds.split, corpus_optional=ds.doc_index is not None)
    collection = data.read_queries(ds.folder / "queries.jsonl")  # every split: training on them is in-domain
    return corpus, ds.folder / "corpus.jsonl", queries, qrels, data_stats, collection


def own_ids(ds: Dataset, queries: dict, corpus: dict | None, declared: bool) -> frozenset:
    """The queries whose document of the same id is the query itself: only those lose that document from their
    results. Declared self-retrieval collections (ArguAna, Quora, --self_retrieval): every query with a
    document of its id; elsewhere only where that document's text is the query's. Never for label-free queries
    (a log's or a pseudo-query's id that equals a document id is a coincidence)."""
    if ds.split is None:
        return frozenset()
    if declared or ds.name.split("-")[0] in SELF_RETRIEVAL:
        return frozenset(q for q in queries if corpus is None or q in corpus)
    if corpus is None:
        return frozenset()

    def same(text: str, doc: dict) -> bool:
        return data.normalise(text) in (
            data.normalise(doc.get("text", "")),
            data.normalise(teacher_outputs.doc_text(doc)),
        )

    return frozenset(q for q, t in queries.items() if q in corpus and same(t, corpus[q]))


def given_indexes(args, count: int) -> list:
    """One opened --doc_index per dataset (None each without the flag), read and checked for shape."""
    if not args.doc_index:
        return [None] * count
    if len(args.doc_index) != count:
        raise UsageError(
            f"--doc_index lists {len(args.doc_index)} indexes for {count} datasets; give one per dataset, in order"
        )
    ids = [None if i in (None, "-") else i for i in (args.doc_ids or [None] * count)]
    opened = [given_index.open_index(spec, i) for spec, i in zip(args.doc_index, ids)]
    for spec, index in zip(args.doc_index, opened):
        if index.searched_as_built and args.index != "flat":
            raise UsageError(f"--index {args.index}: the faiss index {spec} is searched as it was built; drop --index")
    return opened


def is_label_free(args, path: Path, split: str) -> bool:
    """Label-free: asked for, a collection file, a query source given, or a folder of documents and queries
    with no qrels/ at all (a user's collection and query log). A qrels/ without the split is an error."""
    if args.label_free or path.is_file():
        return True
    if (path / "qrels" / f"{split}.tsv").is_file():
        return False
    if args.queries or args.pseudo_queries:
        return True
    return path.is_dir() and not (path / "qrels").exists() and (path / "queries.jsonl").is_file()


def check_datasets(args) -> list[tuple[Dataset, dict | None]]:
    """Every dataset read and checked before the teacher loads or any index is built."""
    out = []
    expanded = data.expand_datasets(args.datasets, args.data_dir, allow_files=True)
    for (name, path, group), index in zip(expanded, given_indexes(args, len(expanded))):
        split = args.split or ("dev" if path.name == "msmarco" else "test")
        if is_label_free(args, path, split):
            if not args.label_free and path.is_dir() and not args.queries and not args.pseudo_queries:
                logger.info("%s has no qrels/: evaluated label-free (agreement with the teacher)", name)
            ds, queries, num_docs = label_free_dataset(args, name, path, group, index)
            out.append((ds, queries))
        else:
            try:
                ds, num_docs = labelled_dataset(name, path, group, split, index)
            except UsageError as e:
                if (path / "qrels" / f"{split}.tsv").is_file():
                    raise
                raise UsageError(f"{e}; or pass --label_free to evaluate agreement with the teacher only") from None
            out.append((ds, None))
        check_index_size(args.index, num_docs, name)
    if (args.queries or args.pseudo_queries) and all(q is None for _, q in out):
        flag = "--queries" if args.queries else "--pseudo_queries"
        raise UsageError(f"{flag} is for label-free datasets, and every dataset here has qrels; add --label_free")
    return out


# ----------------------------------------------------------------------------- in-domain marking


# fewer of a collection's own (non-evaluated) queries among a student's training texts are coincidences of short
# common queries (1 of NFCorpus's 3,237 queries is also an MS MARCO train query), not training on its queries
MIN_SHARED_QUERIES = 10


def trained_documents(sources: dict | None) -> set[str]:
    """Content digests of the collections whose documents trained a student: corpus files and given indexes."""
    corpora = (sources or {}).get("corpora", [])
    documents = {c.get("corpus_sha256") for c in corpora if c.get("texts", 1)}
    documents |= {c.get("index_digest") for c in corpora}
    documents.discard(None)
    return documents


def training_text_marks(sources: dict | None, ds: Dataset, queries: dict, collection: dict, index_digest=None):
    """What a student's training text shares with one evaluation, by content only (never by file location):
    {'leaked_query_ids': evaluated queries it trained on (left out of its retention and agreement),
    'collection_queries_trained': the collection's other queries it trained on, 'in_domain_by': 'documents',
    'queries' or None}."""
    trained = set((sources or {}).get("text_hashes", []))
    leaked = sorted(q for q, t in queries.items() if data.text_hash(t) in trained)
    others = sum(data.text_hash(t) in trained for q, t in collection.items() if q not in queries)
    files = {f.get("sha256") for f in (sources or {}).get("query_files", []) if isinstance(f, dict)}
    documents = trained_documents(sources)
    by = None
    if ds.corpus_sha256 in documents or (index_digest and index_digest in documents):
        by = "documents"
    elif others >= MIN_SHARED_QUERIES or (not trained and ds.queries_sha256 in files):
        by = "queries"  # the queries_sha256 test serves records written before text hashes were kept
    return {"leaked_query_ids": leaked, "collection_queries_trained": others, "in_domain_by": by}


# ----------------------------------------------------------------------------- the table


def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def retention_cis(rows: list[dict], teacher: str, seed: int) -> None:
    """Per-dataset retention of nDCG@10 and R@100 with its interval and paired test, into each student row (in
    place), over the queries it never trained on, from results checked to be made alike."""
    by = {(r["model"], r["dataset"]): r for r in rows}
    for r in rows:
        t = by.get((teacher, r["dataset"]))
        if r["model"] == teacher or not t or "per_query" not in r or "metrics" not in r:
            continue
        results.check_alike(r, t, f"{r['model']} on {r['dataset']}")
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


# ----------------------------------------------------------------------------- main


def load_models(args, names, paths, device, datasets):
    """{name: model}: the teacher and each student (an ONNX Runtime export through its lean query path). Each
    given --doc_index is checked against the teacher before any student loads."""
    for name in names[1:]:  # a damaged export fails here, before the teacher loads
        if serving.is_export(paths[name]):
            serving.check_export(paths[name])
    teacher, _ = encoders.load_model(args.teacher_model, device, path=paths[args.teacher_model])
    checked = [(ds._replace(doc_index=check_index(args, ds, teacher)), q) for ds, q in datasets]
    models = {args.teacher_model: teacher}
    for name in names[1:]:
        exported = serving.is_export(paths[name])
        models[name] = (
            serving.LeanEncoder(paths[name]) if exported else encoders.load_model(name, device, path=paths[name])[0]
        )
        dim = models[name].get_embedding_dimension()
        if dim != teacher.get_embedding_dimension():
            raise UsageError(
                f"{name} gives {dim}-d embeddings but the teacher index is {teacher.get_embedding_dimension()}-d; "
                "train it with distillation.py against this teacher"
            )
    return models, checked


def check_index(args, ds: Dataset, teacher):
    """The dataset's given index, checked to belong to the teacher (given_index.verify on a seeded sample of its
    documents, encoded as the teacher's own index would be); its record is kept on the index."""
    index = ds.doc_index
    if index is None:
        return None
    sim = encoders.similarity_name(teacher)
    given_index.check_shape(index, teacher.get_embedding_dimension(), sim, args.teacher_model)
    corpus, _ = corpus_text(ds.folder, index)

    def encode(ids):
        with encoders.max_length(teacher, args.corpus_max_seq_length):
            texts = [teacher_outputs.doc_text(corpus[i]) for i in ids]
            return teacher.encode_document(texts, batch_size=args.corpus_batch_size, convert_to_numpy=True)

    index.verification = given_index.verify(index, encode, corpus, sim, args.teacher_model, args.seed)
    return index


def main(argv=None) -> dict:
    args = parse_args(argv)
    cli.start_run(args.log_level, args.seed, args.output_path)
    device = cli.pick_device(args.device)
    config = run_files.run_info(vars(args), device, argv, __file__)
    names = list(dict.fromkeys([args.teacher_model, *args.models]))
    paths = {}

    def resolve(name):
        paths[name] = paths.get(name) or encoders.resolve_model_path(name, args.data_dir)
        return paths[name]

    datasets = check_datasets(args)  # first: a bad dataset is named before any model is looked up
    sources = {name: run_files.text_sources(resolve(name)) for name in names}
    models, datasets = load_models(args, names, paths, device, datasets)
    out_root = Path(args.output_path) / "retrieval" / run_files.slug(args.teacher_model)
    rows = []
    for ds, label_free_queries_ in datasets:
        rows += evaluate_dataset(args, ds, label_free_queries_, names, paths, models, sources, out_root, config)
    retention_cis(rows, args.teacher_model, args.seed)
    rows = group_rows(rows)
    labelled = list(dict.fromkeys(r["dataset"] for r in rows if "metrics" in r))
    tables = [results_table(rows, labelled, args.teacher_model, args.seed)] if labelled else []
    if any("metrics" not in r for r in rows):
        tables.append(label_free_table(rows, args.teacher_model))
    table = "\n".join(tables)
    run_files.write_text(out_root / "results.md", table)
    print(table)
    return {"rows": rows, "table": table}


def document_side(args, ds: Dataset, teacher, teacher_path, corpus, corpus_file):
    """(DocIndex, its record) of a dataset: the given --doc_index, or the teacher index built here (cached)."""
    if ds.doc_index is not None:
        index = ds.doc_index
        record = {"given": True, "digest": index.digest(), "documents_encoded": 0, **index.verification}
        record.update(kind=index.kind, faiss_type=index.faiss_type, num_docs=len(index))
        return index, {**record, "folder": Path(args.output_path) / "index" / "given" / index.digest()}
    doc_emb, doc_ids, meta = teacher_outputs.teacher_index(
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
        cosine = encoders.similarity_name(teacher) == "cosine"
        folder = given_index.write_pyserini(Path(args.export_index) / ds.name, doc_emb, doc_ids, cosine)
        logger.info("wrote the teacher index of %s in pyserini's layout: %s", ds.name, folder)
    index = given_index.open_npy(Path(meta["folder"]) / "embeddings.npy", doc_ids)
    digest = teacher_outputs.sha256_texts([json.dumps(meta["key"], sort_keys=True)])[:16]
    record = {"given": False, "digest": digest, "documents_encoded": meta["num_docs"], "index_verified": True}
    return index, {**record, "folder": meta["folder"], "encode_seconds": meta.get("encode_seconds")}


def evaluate_dataset(args, ds: Dataset, queries, names, paths, models, sources, out_root, config) -> list[dict]:
    """One row per model on one dataset: finished results reused when model, data and settings all match."""
    corpus, corpus_file, queries, qrels, data_stats, collection = load_dataset(ds, queries)
    own = own_ids(ds, queries, corpus, args.self_retrieval)
    teacher = models[args.teacher_model]
    index, index_meta = document_side(args, ds, teacher, paths[args.teacher_model], corpus, corpus_file)
    sim = encoders.similarity_name(teacher)  # the teacher's own score function, not beir's cosine default
    settings = {
        "dataset": ds.digest,
        "split": ds.split,
        "index": args.index,
        # the index by content (its files' digests and faiss type, or the built index's key), never by path
        "teacher_index": index_meta["digest"],
        "index_verified": index_meta["index_verified"],
        "k_values": args.k_values,
        "similarity": sim,
        "own_ids": teacher_outputs.sha256_texts(sorted(own))[:16],
        "faiss": __import__("faiss").__version__,
        "schema": RESULT_SCHEMA,
        # hnsw/ivfpq: built with the seed and these settings
        **({"index_seed": args.index_seed, "index_build": search.BUILD[args.index]} if args.index != "flat" else {}),
    }
    records, pending = {}, []
    for name in names:
        runtime = {"onnxruntime": __import__("onnxruntime").__version__} if serving.is_export(paths[name]) else {}
        key, key_digest = teacher_outputs.cache_key("retrieval", paths[name], {**settings, **runtime})
        path = out_root / run_files.slug(name) / results.result_file(ds.name, args.index)
        old = json.loads(path.read_text()) if path.exists() and not args.overwrite else {}
        if old.get("result_key") == key_digest and (not args.save_run or path.with_suffix(".trec").is_file()):
            logger.info("%s on %s: finished earlier with the same model, data and settings, reusing", name, ds.name)
            records[name] = old
        else:
            pending.append((name, path, key, key_digest))
    if pending:
        found = evaluate_models(pending, models, queries, qrels, own, index, index_meta, args, sim, config)
        records.update({n: {**r, "made_alike": results.made_alike(settings)} for n, r in found.items()})
    rows, fresh = [], {p[0] for p in pending}
    for name in names:
        record = {**records[name], "dataset": ds.name, "dataset_path": str(ds.folder), "split": ds.split}
        if name != args.teacher_model:
            teacher_record = records[args.teacher_model]
            mark_training_text(record, teacher_record, sources[name], ds, queries, collection, args.seed)
        record["data_stats"] = data_stats
        if name in fresh:  # fresh results are written; reused ones stay as they are
            run_files.write_json(out_root / run_files.slug(name) / results.result_file(ds.name, args.index), record)
        rows.append({**record, "group": ds.group, "reused": name not in fresh})
    return rows


def mark_training_text(record, teacher, sources, ds: Dataset, queries: dict, collection: dict, seed: int) -> None:
    """A student's training-text record, its leaked queries, the in-domain mark and its retention (in place)."""
    given = record.get("doc_index", {})
    marks = training_text_marks(sources, ds, queries, collection, given.get("digest") if given.get("given") else None)
    leaked = marks["leaked_query_ids"]
    if leaked:
        logger.warning(
            "%s trained on %d of the %d %s queries: they are left out of its retention and agreement",
            record["model"],
            len(leaked),
            len(queries),
            ds.name,
        )
    record.update(marks)
    record["leaked_queries"] = len(leaked)
    record["training_text_sources"] = {k: v for k, v in (sources or {}).items() if k != "text_hashes"}
    record["in_domain_text"] = marks["in_domain_by"] is not None
    record["training_text"] = results.kind(record)
    if "metrics" in record and "per_query" in teacher:
        results.check_alike(record, teacher, f"{record['model']} on {ds.name}")
        record["retention_ndcg@10"] = results.clean_ratio(record, teacher)
    if "agreement" in record and leaked:
        kept = [q for q in sorted(queries) if q not in set(leaked)]
        per = record["per_query"]
        record["agreement"] = {m: stats.mean_ci([per[m][q] for q in kept], seed) for m in metrics.AGREEMENT}


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
    found = retrieve(searcher, q_emb, q_ids, doc_ids, max(args.k_values))
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


def evaluate_models(pending, models, queries, qrels, own, index, index_meta, args, sim, config):
    """{model name: record} for the models not evaluated before on this dataset; TREC runs on --save_run."""
    t0 = time.perf_counter()
    cosine = sim == "cosine"  # cosine teachers: inner product over unit vectors
    searcher, exact = searchers(index, args.index, index_meta["folder"], args.index_seed, cosine)
    doc_ids = index.ids
    build_secs = time.perf_counter() - t0
    q_ids = sorted(queries)
    q_texts = [queries[q] for q in q_ids]
    max_k = max(args.k_values)
    # the teacher's own ranking and query embeddings: what each student's agreement is measured against
    teacher_run = encode_and_search(models[args.teacher_model], searcher, q_texts, q_ids, doc_ids, args, cosine)
    t_emb, t_results = teacher_run[:2]
    t_top = metrics.top_ids(metrics.drop_own_ids(qrels, t_results, own)[0], 10)
    out = {}
    for name, path, key, key_digest in pending:
        model = models[name]
        q_emb, found, enc_secs, search_secs = (
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
        record.update(score(qrels, found, args.k_values, own))
        if name != args.teacher_model:
            s_top = metrics.top_ids(metrics.drop_own_ids(qrels, found, own)[0], 10)
            agree = metrics.agreement(s_top, t_top, q_emb, t_emb, q_ids, args.seed)
            record["agreement"] = agree["summary"]
            record.setdefault("per_query", {}).update(agree["per_query"])
        if exact is not None:
            exact_ids, approx_ids = exact(q_emb, max_k)[1], searcher(q_emb, max_k)[1]
            record["approx_recall"] = {
                f"@{k}": metrics.overlap_at_k(exact_ids, approx_ids, k) for k in (10, 100) if k <= max_k
            }
        if args.save_run:
            write_trec(path.with_suffix(".trec"), name, q_ids, found)
        summary = (
            f"nDCG@10 {record['metrics']['NDCG@10']:.4f}"
            if qrels is not None
            else f"overlap@10 {record.get('agreement', {}).get('overlap@10', {}).get('value', 1.0):.3f}"
        )
        logger.info("%s: %s (%d queries, encode %.2fs)", name, summary, len(q_ids), enc_secs)
        out[name] = record
    return out


def write_trec(path: Path, name: str, q_ids, found) -> None:
    lines = [
        f"{qid} Q0 {did} {rank} {score:.6f} {run_files.slug(name)}"
        for qid in q_ids
        for rank, (did, score) in enumerate(sorted(found[qid].items(), key=lambda x: -x[1]), 1)
    ]
    run_files.write_text(path, "\n".join(lines) + "\n")


if __name__ == "__main__":
    cli.cli(main)
