"""What a student trained on, against one evaluation, by content only: in-domain collections, leaked queries
(left out of its retention and agreement, counted)."""

from __future__ import annotations

import logging

from qdistill import data, metrics, results, stats
from qdistill.eval_data import Dataset

logger = logging.getLogger(__name__)

# fewer of a collection's own (non-evaluated) queries among a student's training texts are coincidences of short
# common queries (1 of NFCorpus's 3,237 queries is also an MS MARCO train query), not training on its queries
MIN_SHARED_QUERIES = 10


def trained_documents(sources: dict | None) -> set[str]:
    """Content digests of the collections whose documents trained a student: corpus files and given indexes."""
    corpora = (sources or {}).get("corpora", [])
    documents = {c.get("corpus_sha256") for c in corpora if c.get("texts", 1)}
    documents |= {c.get("index_digest") for c in corpora}
    documents |= {c.get("index_id_set") for c in corpora}  # the same documents through any form of index
    documents.discard(None)
    return documents


def training_text_marks(sources: dict | None, ds: Dataset, queries: dict, collection: dict, index_digests=()):
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
    if ds.corpus_sha256 in documents or documents & {d for d in index_digests if d}:
        by = "documents"
    elif others >= MIN_SHARED_QUERIES or (not trained and ds.queries_sha256 in files):
        by = "queries"  # the queries_sha256 test serves records written before text hashes were kept
    return {"leaked_query_ids": leaked, "collection_queries_trained": others, "in_domain_by": by}


def mark_training_text(record, teacher, sources, ds: Dataset, queries: dict, collection: dict, seed: int) -> None:
    """A student's training-text record, its leaked queries, the in-domain mark and its retention (in place)."""
    index = record.get("doc_index", {})
    # the evaluated index by its content (a given one) and by its set of ids (any form, built here or given)
    digests = (index.get("digest") if index.get("given") else None, index.get("id_set"))
    marks = training_text_marks(sources, ds, queries, collection, digests)
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
        record["retention_ndcg@10"] = results.clean_ratio(record, teacher)
    if "agreement" in record and leaked:
        kept = [q for q in sorted(queries) if q not in set(leaked)]
        per = record["per_query"]
        record["agreement"] = {m: stats.mean_ci([per[m][q] for q in kept], seed) for m in metrics.AGREEMENT}
