"""Checking that an index the user brings belongs to the teacher, before anything is searched: dimension, metric, ids,
norms, and a seeded sample of documents re-encoded exactly as the index would have been (document prompt, max length)
and compared with the stored vectors (or, for quantised indexes, their codes)."""

from __future__ import annotations

import logging

import numpy as np

from qdistill import search
from qdistill.cli import UsageError
from qdistill.given_index import DocIndex

logger = logging.getLogger(__name__)

SAMPLE = 64  # documents re-encoded by the check

# cosine of stored to re-encoded vectors: median over the sample, and every one. Measured with all-MiniLM-L6-v2
# on Cranfield: the same model in bf16 gives 0.99995; the index built without the document prompt "passage: "
# 0.997, without an instruction prompt 0.992 (long documents dilute a prompt): hence a floor above those
MEDIAN_FLOOR, MIN_FLOOR = 0.999, 0.99

# quantised indexes: codes compared with the codes of the fresh vectors (a document's own codes can flip a level
# where the fresh vector sits on a boundary, hence a lower floor for the lowest); without a codec, the share of
# sampled documents found in their own top-10 (which an index of low recall can also fail)
CODES_MIN_FLOOR = 0.98

SELF_TOP_K, SELF_FLOOR = 10, 0.9


def check_shape(index: DocIndex, dim: int, similarity: str, teacher_name: str) -> None:
    """What can be checked without encoding: dimension and metric against the teacher's."""
    where = f"index at {index.path}"
    if index.dim != dim:
        raise UsageError(
            f"{where} holds {index.dim}-d vectors but teacher {teacher_name} gives {dim}-d; "
            "was it built with another model?"
        )
    # a cosine teacher's index may rank by inner product, cosine or L2 over its unit vectors (the same order; unit
    # length is checked with the sample); a dot-product teacher's only by inner product
    if index.metric != "ip" and not (index.metric in ("cosine", "l2") and similarity == "cosine"):
        raise UsageError(
            f"{where} searches by {index.metric} distance but teacher {teacher_name} scores by {similarity}; "
            "rebuild it with faiss.METRIC_INNER_PRODUCT"
        )


def check_qrels(index: DocIndex, qrels: dict | None) -> None:
    if not qrels:
        return
    judged = sorted({d for r in qrels.values() for d in r})
    missing = [d for d, row in zip(judged, index.rows_of(judged)) if row is None]
    if missing:
        raise UsageError(
            f"index at {index.path} lacks {len(missing)} of the {len(judged)} documents the qrels judge "
            f"(e.g. {missing[0]!r}); is it the index of this collection?"
        )


def check_cosines(stored, fresh, subject: str, what: str, hint: str, min_floor: float = MIN_FLOOR) -> tuple:
    """(median, lowest) cosine of stored rows to the re-encoded ones; one error line below the floors. The one
    comparison behind every check of given vectors (documents, codes, logged queries)."""
    cos = search.cosine_rows(stored, fresh)
    median, low = float(np.median(cos)), float(cos.min())
    if median < MEDIAN_FLOOR or low < min_floor:
        raise UsageError(
            f"{subject}: median cosine {median:.4f} (lowest {low:.4f}) {what}, {MEDIAN_FLOOR} needed; {hint}"
        )
    return median, low


def check_dot_norms(stored, fresh, subject: str, teacher_name: str) -> None:
    """A dot-product teacher's stored vectors must keep its norms (unit vectors would change every score)."""
    ratio = np.median(np.abs(np.linalg.norm(stored, axis=1) / np.maximum(np.linalg.norm(fresh, axis=1), 1e-12) - 1))
    if ratio > 1e-2:
        raise UsageError(
            f"{subject} norms differ from teacher {teacher_name}'s by {ratio:.0%} (median); the teacher scores by "
            "dot product: were they normalised?"
        )


def verify(index: DocIndex, encode_documents, corpus: dict | None, similarity: str, teacher_name: str, seed: int):
    """{'index_verified', ...}: a seeded sample of corpus documents encoded by `encode_documents` (the teacher,
    as its index would) against the stored vectors. Refused in one line when they disagree; without corpus text
    the run goes on with a warning and the record says index_verified: false."""
    where = f"index at {index.path}"
    if not corpus:
        logger.warning("%s: no corpus text to check it with; results say index_verified: false", where)
        return {"index_verified": False, "reason": "no corpus text"}
    ids = sorted(corpus)
    shared = [d for d, row in zip(ids, index.rows_of(ids)) if row is not None]
    if not shared:
        raise UsageError(f"{where} holds none of the corpus's {len(corpus)} document ids; is it this collection's?")
    rng = np.random.default_rng(seed)
    sample = [shared[i] for i in sorted(rng.choice(len(shared), min(SAMPLE, len(shared)), replace=False))]
    rows = index.rows_of(sample)
    fresh = np.asarray(encode_documents(sample), np.float32)
    record = {"sample": len(sample), "corpus_docs_missing": len(corpus) - len(shared)}
    subject = f"{where} does not match teacher {teacher_name}"
    if index.exact:
        stored = index.vectors(rows)
        hint = "was it built with another model, prompt or max length, or are its ids in another order?"
        median, low = check_cosines(stored, fresh, subject, f"over {len(sample)} documents", hint)
        record.update(method="cosine of stored to re-encoded vectors", median_cosine=median, min_cosine=low)
        _check_norms(index, stored, fresh, similarity, teacher_name)
    else:  # codes, not vectors: the stored codes against the codes the index would give the fresh vectors
        q = search.unit(fresh) if similarity == "cosine" else fresh
        roundtrip = _as_coded(index, q)
        if roundtrip is not None:
            what = f"of its codes to those of {len(sample)} re-encoded documents"
            hint = "was it built with another model, prompt or max length, or are its ids in another order?"
            median, low = check_cosines(index.vectors(rows), roundtrip, subject, what, hint, CODES_MIN_FLOOR)
            record.update(method=f"cosine of stored to re-encoded codes (a {index.faiss_type} stores codes)")
            record.update(median_cosine=median, min_cosine=low)
        else:  # no standalone codec: does each sampled document find itself?
            _, top = index.search(q, SELF_TOP_K, similarity == "cosine")
            found = float(np.mean([r in t for r, t in zip(rows, top.tolist())]))
            record.update(method=f"own document in its top-{SELF_TOP_K} (a {index.faiss_type} stores codes)")
            record["self_found"] = found
            if found < SELF_FLOOR:
                raise UsageError(
                    f"{where} does not match teacher {teacher_name}: only {found:.0%} of {len(sample)} re-encoded "
                    f"documents find themselves in its top-{SELF_TOP_K} ({SELF_FLOOR:.0%} needed); was it built "
                    "with another model or prompt, or are its ids in another order?"
                )
    if record["corpus_docs_missing"]:
        logger.warning("%s: %d corpus documents are not in the index", where, record["corpus_docs_missing"])
    logger.info("%s matches %s (%s)", where, teacher_name, record["method"])
    return {"index_verified": True, **record}


def _as_coded(index: DocIndex, vectors: np.ndarray) -> np.ndarray | None:
    """The vectors as the index would store them (its own encoder, then decoded), or None when it has no
    standalone codec; an HNSW index codes with its storage."""
    import faiss

    codec = faiss.downcast_index(index.index.storage) if isinstance(index.index, faiss.IndexHNSW) else index.index
    try:
        return codec.sa_decode(codec.sa_encode(np.ascontiguousarray(vectors, np.float32)))
    except RuntimeError:
        return None


def _check_norms(index: DocIndex, stored, fresh, similarity: str, teacher_name: str) -> None:
    """Searched as stored, a faiss file of a cosine teacher must hold unit vectors; a dot teacher's index must
    keep the teacher's norms (unit vectors there would change every score)."""
    norms = np.linalg.norm(stored, axis=1)
    own_cosine = index.metric == "cosine"  # an index that scores by cosine itself (Milvus COSINE) takes any norm
    if similarity == "cosine" and index.searched_as_built and not own_cosine and np.median(np.abs(norms - 1)) > 1e-2:
        raise UsageError(
            f"index at {index.path} holds vectors of median norm {np.median(norms):.3g}, but teacher {teacher_name} "
            "scores by cosine and a faiss index is searched as built: add faiss.normalize_L2'd vectors"
        )
    if similarity == "dot":
        check_dot_norms(stored, fresh, f"index at {index.path}: stored vector", teacher_name)
