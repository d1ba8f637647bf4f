"""Datasets of an evaluation, read and checked before any model loads: BEIR folders with qrels, collections
without them (a query log or pseudo-queries), the user's own index per dataset, and which queries lose
their own id."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import NamedTuple

from qdistill import cli, data, given_index, index_check, milvus, teacher_outputs, training_text
from qdistill.cli import UsageError
from qdistill.search import check_index_size

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What an evaluation is asked to do, as evaluate_retrieval.py's flags resolve it."""

    teacher_model: str
    models: list[str]
    datasets: list[str]
    data_dir: str
    split: str | None
    label_free: bool
    queries: str | None
    pseudo_queries: int | None
    k_values: list[int]
    corpus_max_seq_length: int | None
    corpus_batch_size: int
    query_batch_size: int
    encode_devices: list[str] | None
    index: str
    doc_index: list[str] | None
    doc_ids: list[str] | None
    export_index: str | None
    output_path: str
    save_run: bool
    overwrite: bool
    self_retrieval: bool
    seed: int
    index_seed: int
    allow_partial_index: bool = False
    milvus_search_params: str | None = None
    # a teacher known only by its vectors: each dataset's logged query vectors and their ids (vector_teacher.py)
    teacher_query_embeddings: list[str] | None = None
    teacher_query_ids: list[str] | None = None
    teacher_similarity: str | None = None
    vectors_only: bool = False
    truncate_dim: int | None = None  # Matryoshka: the first d dimensions of every vector, one d per pass


SELF_RETRIEVAL = {"arguana", "quora"}  # BEIR collections whose queries are documents (beir's ignore_identical_ids)


class Dataset(NamedTuple):
    name: str
    folder: Path  # the BEIR folder, or the collection tsv of a label-free dataset
    group: str | None
    split: str | None  # None: label-free
    digest: str  # corpus, queries and qrels content
    corpus_sha256: str | None  # None: no corpus text (the documents are in a given --doc_index)
    queries_sha256: str
    doc_index: given_index.DocIndex | None = None  # the user's index, searched instead of one built here
    teacher_log: object | None = None  # a vectors-only teacher: this dataset's logged query vectors (LoggedEncoder)


def labelled_dataset(name, folder: Path, group, split, index=None) -> tuple[Dataset, int]:
    """(dataset, documents) of a BEIR folder with qrels, every file read and checked (malformed files fail here,
    not after indexing); with a given index the corpus is optional and the qrels' documents must be in it."""
    corpus, _, qrels, _ = data.load_beir(folder, split, corpus_optional=index is not None)
    hashes = [
        teacher_outputs.sha256_file(f) if f.is_file() else None for f in data.check_beir(folder, split, corpus=False)
    ]
    if index is not None:
        index_check.check_qrels(index, qrels)
    digest = teacher_outputs.sha256_texts(h or "-" for h in hashes)[:16]
    return Dataset(name, folder, group, split, digest, hashes[0], hashes[1], index), len(index or corpus)


def corpus_text(path: Path, index) -> tuple[dict | None, Path | None]:
    """(corpus, its file) of a dataset; (None, None) where a given index stands in for absent documents."""
    has_text = path.is_file() or (path / "corpus.jsonl").is_file()
    return data.load_corpus(path) if has_text or index is None else (None, None)


def label_free_queries(cfg, folder: Path, corpus: dict) -> dict[str, str]:
    """{id: text}: --queries, else the folder's queries.jsonl, else --pseudo_queries N sampled from the documents:
    a function of (collection, N, seed) alone; a student that trained on some of them has those left out of its
    agreement and counted (leaked queries), as on any query set."""
    if cfg.queries:
        return data.read_queries(cli.check_file(cfg.queries, "--queries", "pass a query log (id<TAB>text)"))
    if folder.is_dir() and (folder / "queries.jsonl").is_file() and not cfg.pseudo_queries:
        return data.read_queries(folder / "queries.jsonl")
    if not cfg.pseudo_queries:
        raise UsageError(
            f"{folder} has no relevance labels and no queries; pass --queries FILE (a query log) or --pseudo_queries N"
        )
    if corpus is None:
        raise UsageError(f"--pseudo_queries samples document text, and {folder} has none; pass --queries FILE")
    spans = training_text.sample_spans(corpus, cfg.pseudo_queries, list(range(3, 13)), cfg.seed + 5)
    if len(spans) < cfg.pseudo_queries:
        logger.warning(
            "%s: only %d distinct pseudo-queries in its %d documents (%d asked for); evaluating those",
            folder.name,
            len(spans),
            len(corpus),
            cfg.pseudo_queries,
        )
    return {f"pseudo-{i}": s for i, s in enumerate(spans)}


def label_free_dataset(cfg, name, path: Path, group, index=None) -> tuple[Dataset, dict, int]:
    corpus, file = corpus_text(path, index)
    queries = {q: t for q, t in label_free_queries(cfg, path, corpus).items() if t.strip()}
    if not queries:
        given = cfg.queries or (path / "queries.jsonl" if path.is_dir() and not cfg.pseudo_queries else None)
        fix = f"{given} holds no non-empty query" if given else "no pseudo-query could be sampled from its documents"
        raise UsageError(f"no queries for {name}: {fix}; pass a query log with --queries FILE or --pseudo_queries N")
    q_sha = teacher_outputs.sha256_texts(x for q in sorted(queries) for x in (q, queries[q]))
    corpus_sha = teacher_outputs.sha256_file(file) if file else None
    # its own result name: never the labelled results of the same folder, nor another query source's
    name = f"{name}-label-free" if not cfg.pseudo_queries else pseudo_name(name, cfg.pseudo_queries, cfg.seed)
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


def given_indexes(cfg, count: int) -> list:
    """One opened --doc_index per dataset (None each without the flag), read and checked for shape."""
    if not cfg.doc_index:
        return [None] * count
    if len(cfg.doc_index) != count:
        raise UsageError(
            f"--doc_index lists {len(cfg.doc_index)} indexes for {count} datasets; give one per dataset, in order"
        )
    ids = [None if i in (None, "-") else i for i in (cfg.doc_ids or [None] * count)]
    params = milvus.search_params(cfg.milvus_search_params)
    if params and not any(milvus.is_milvus(spec) for spec in cfg.doc_index):
        raise UsageError("--milvus_search_params goes with a milvus: --doc_index; the others carry their own")
    opened = [given_index.open_index(spec, i, params) for spec, i in zip(cfg.doc_index, ids)]
    for spec, index in zip(cfg.doc_index, opened):
        if index.searched_as_built and cfg.index != "flat":
            raise UsageError(
                f"--index {cfg.index}: the index {cli.redact(str(spec))} is searched as it was built; drop --index"
            )
        if index.kind == "milvus" and max(cfg.k_values) + 1 > milvus.MAX_TOP_K:
            raise UsageError(
                f"--k_values {max(cfg.k_values)}: Milvus returns at most {milvus.MAX_TOP_K} results a query "
                f"(k + 1 are searched); lower it"
            )
    return opened


def is_label_free(cfg, path: Path, split: str) -> bool:
    """Label-free: asked for, a collection file, a query source given, or a folder of documents and queries
    with no qrels/ at all (a user's collection and query log). A qrels/ without the split is an error."""
    if cfg.label_free or path.is_file():
        return True
    if (path / "qrels" / f"{split}.tsv").is_file():
        return False
    if cfg.queries or cfg.pseudo_queries:
        return True
    return path.is_dir() and not (path / "qrels").exists() and (path / "queries.jsonl").is_file()


def check_datasets(cfg) -> list[tuple[Dataset, dict | None]]:
    """Every dataset read and checked before the teacher loads or any index is built."""
    out = []
    expanded = data.expand_datasets(cfg.datasets, cfg.data_dir, allow_files=True)
    for (name, path, group), index in zip(expanded, given_indexes(cfg, len(expanded))):
        split = cfg.split or ("dev" if path.name == "msmarco" else "test")
        if is_label_free(cfg, path, split):
            if not cfg.label_free and path.is_dir() and not cfg.queries and not cfg.pseudo_queries:
                logger.info("%s has no qrels/: evaluated label-free (agreement with the teacher)", name)
            ds, queries, num_docs = label_free_dataset(cfg, name, path, group, index)
            out.append((ds, queries))
        else:
            try:
                ds, num_docs = labelled_dataset(name, path, group, split, index)
            except UsageError as e:
                if (path / "qrels" / f"{split}.tsv").is_file():
                    raise
                raise UsageError(f"{e}; or pass --label_free to evaluate agreement with the teacher only") from None
            out.append((ds, None))
            if cfg.queries or cfg.pseudo_queries:
                logger.warning("%s has qrels: evaluated on them; --queries/--pseudo_queries serve the others", name)
        check_index_size(cfg.index, num_docs, name)
        if cfg.export_index:  # before any work: a folder that is not an earlier export is the user's
            given_index.check_export_folder(Path(cfg.export_index) / name)
    if (cfg.queries or cfg.pseudo_queries) and all(q is None for _, q in out):
        flag = "--queries" if cfg.queries else "--pseudo_queries"
        raise UsageError(f"{flag} is for label-free datasets, and every dataset here has qrels; add --label_free")
    return out


def teacher_logs(cfg, datasets: list[tuple[Dataset, dict | None]]) -> list[tuple[Dataset, dict | None]]:
    """A vectors-only teacher: each dataset's --teacher_query_embeddings opened (every evaluated query's id in it,
    every row finite) and its index checked without re-encoding anything: dimensions, metric, every row scanned,
    the ids against the corpus, the logged queries against the index (vector_teacher.check_against_index);
    index_verified false. All before any student loads. The teacher's score function is declared or read from the
    logs' norms, the same for all."""
    from qdistill import vector_teacher

    if not cfg.vectors_only:
        return datasets
    if len(cfg.teacher_query_embeddings) != len(datasets) or len(cfg.teacher_query_ids or []) != len(datasets):
        raise UsageError(
            f"a teacher known by its vectors needs one --teacher_query_embeddings and one --teacher_query_ids per "
            f"dataset, in order: {len(datasets)} datasets, {len(cfg.teacher_query_embeddings)} vector files, "
            f"{len(cfg.teacher_query_ids or [])} id files"
        )
    out, similarity = [], None
    for (ds, queries), vectors, ids in zip(datasets, cfg.teacher_query_embeddings, cfg.teacher_query_ids):
        if ds.doc_index is None:
            raise UsageError(f"{ds.name}: a teacher known by its vectors is searched in your index; pass --doc_index")
        if ds.split is None:
            query_file = Path(cfg.queries) if cfg.queries else ds.folder / "queries.jsonl"
            evaluated = queries
        else:
            query_file = ds.folder / "queries.jsonl"
            evaluated = data.load_beir(ds.folder, ds.split, corpus_optional=True)[1]
        log = vector_teacher.open_log(vectors, ids, query_file, evaluated, ds.name)
        found = vector_teacher.scan_log(log, cfg.teacher_similarity)
        if similarity not in (None, found):
            raise UsageError(f"the logs read as {similarity} and {found} teachers; declare --teacher_similarity")
        similarity = found
        index = ds.doc_index
        vector_teacher.check_truncation(cfg.truncate_dim, min(log.rows.dim, index.dim), "logged vectors")
        if log.rows.dim != index.dim and cfg.truncate_dim is None:
            raise UsageError(
                f"logged query vectors {vectors} are {log.rows.dim}-d but the index {index.path} is {index.dim}-d; "
                f"pass --truncate_dim {min(log.rows.dim, index.dim)} if one holds Matryoshka-truncated vectors"
            )
        index_check.check_shape(index, index.dim, similarity, cfg.teacher_model)  # the metric (dimensions: above)
        corpus, _ = corpus_text(ds.folder, index)
        record = index_check.verify(
            index, None, corpus, similarity, cfg.teacher_model, cfg.seed, cfg.allow_partial_index
        )
        checked = vector_teacher.check_against_index(log, index, evaluated, similarity, cfg.truncate_dim, cfg.seed)
        index.verification = vector_teacher.vectors_only_index_record(record, checked)
        encoder = vector_teacher.LoggedEncoder(cfg.teacher_model, log, similarity)
        out.append((ds._replace(teacher_log=encoder), queries))
    return out
