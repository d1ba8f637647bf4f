"""Checking that an index the user brings belongs to the teacher, before anything is searched: dimension, metric, ids,
norms, and a seeded sample of documents re-encoded exactly as the index would have been (document prompt, max length)
and compared with the stored vectors (or, for quantised indexes, their codes)."""

from __future__ import annotations

import logging

import numpy as np
from tqdm.auto import tqdm

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

# a stored row's norm may differ from the teacher's by this much (fp16 storage rounds at ~1e-3); decoded codes
# scatter (a 4-bit product quantiser moves unit vectors' norms by 17% median), so they are compared with the
# codec's own coding of the re-encoded unit vectors: 2.5% median and 20% at most
NORM_TOLERANCE, CODES_NORM_TOLERANCE = 1e-2, 0.05
# an index may lack this share of the corpus's documents before it is refused (--allow_partial_index)
PARTIAL_SHARE = 0.01


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
    comparison behind every check of given vectors (documents, codes, logged queries). Written so that a NaN
    fails it: `not (x >= floor)` is True for NaN, where `x < floor` is False."""
    cos = search.cosine_rows(stored, fresh)
    median, low = float(np.median(cos)), float(np.min(cos))
    if not (median >= MEDIAN_FLOOR and low >= min_floor):
        raise UsageError(
            f"{subject}: median cosine {median:.4f} (lowest {low:.4f}) {what}, {MEDIAN_FLOOR} needed; {hint}"
        )
    return median, low


def check_dot_norms(stored, fresh, subject: str, teacher_name: str) -> float:
    """A dot-product teacher's stored vectors must keep its norms row by row (unit or rescaled vectors would
    change every score): the largest relative difference, refused above 1%."""
    ratio = np.abs(np.linalg.norm(stored, axis=1) / np.maximum(np.linalg.norm(fresh, axis=1), 1e-12) - 1)
    worst = float(np.max(ratio))
    if not (worst <= NORM_TOLERANCE):
        raise UsageError(
            f"{subject} norms differ from teacher {teacher_name}'s by up to {worst:.0%} ({int(np.sum(ratio > 1e-2))} "
            f"of {len(ratio)} checked rows); the teacher scores by dot product: were they normalised or rescaled?"
        )
    return worst


def scan(index, similarity: str, subject: str) -> dict:
    """One streaming pass over every stored row (one chunk in memory): every value finite, every row's norm where
    the search needs it (unit for a cosine teacher's index searched as built by inner product or L2; non-zero
    where vectors are normalised at search). Refused in one line naming the first bad row and its id."""
    unit_needed = similarity == "cosine" and index.searched_as_built and index.metric in ("ip", "l2")
    rows, low, high, off = 0, np.inf, 0.0, 0
    first_off = None
    for start, block in tqdm(index.chunks(), desc="checking every stored vector", unit="chunk", leave=False):
        block = np.asarray(block, np.float32)
        bad = ~np.isfinite(block).all(1)
        if bad.any():
            r = start + int(np.flatnonzero(bad)[0])
            raise UsageError(
                f"{subject}: row {r} (id {index.ids[r]!r}) and {int(bad.sum()) - 1} more rows of this block hold NaN "
                "or infinite values; rebuild the index from finite vectors"
            )
        norms = np.linalg.norm(block, axis=1)
        low, high = min(low, float(norms.min(initial=np.inf))), max(high, float(norms.max(initial=0.0)))
        # stored originals row by row; decoded codes scatter with the quantiser (checked against the codec's own
        # coding of unit vectors on the sample instead: verify)
        wrong = np.abs(norms - 1) > NORM_TOLERANCE if index.exact else np.zeros(len(norms), bool)
        if unit_needed and wrong.any():
            off += int(wrong.sum())
            first_off = first_off if first_off is not None else start + int(np.flatnonzero(wrong)[0])
        rows += len(block)
    if rows != len(index):
        raise UsageError(f"{subject}: {rows} rows read but it declares {len(index)}; is it whole?")
    if unit_needed and off:
        raise UsageError(
            f"{subject}: {off} of {rows} vectors are not unit length (e.g. row {first_off}, id "
            f"{index.ids[first_off]!r}), but the teacher scores by cosine and this index is searched as built by "
            f"{index.metric}: store faiss.normalize_L2'd vectors"
        )
    if similarity == "cosine" and not (low > 1e-6):
        raise UsageError(f"{subject}: a stored vector has norm {low:.3g}; a cosine teacher's vectors are never zero")
    what = "finite and unit length" if unit_needed and index.exact else "finite"
    return {"rows_scanned": rows, "norm_min": round(low, 6), "norm_max": round(high, 6), "rows": what}


def sample_rows(corpus_rows: list[int | None], seed: int) -> list[int]:
    """Rows to re-encode, stratified over the whole index in row order and always holding the first and the last
    row with corpus text: ids shifted against the vectors from any row to the end are caught whatever the seed."""
    rows = sorted(r for r in corpus_rows if r is not None)
    if len(rows) <= SAMPLE:
        return rows
    rng = np.random.default_rng(seed)
    edges = np.linspace(1, len(rows) - 1, SAMPLE - 1).astype(int)  # SAMPLE - 2 strata between first and last
    inner = [int(rng.integers(a, max(a + 1, b))) for a, b in zip(edges[:-1], edges[1:])]
    return sorted({rows[0], rows[-1], *(rows[i] for i in inner)})


def verify(index, encode_documents, corpus, similarity, teacher_name, seed, allow_partial: bool = False) -> dict:
    """{'index_verified', 'checked', ...}: every stored row scanned (scan), then documents re-encoded by
    `encode_documents` (the teacher, as its index would) on a stratified sample of rows and compared with what
    is stored: vectors, or codes through the index's own codec, or (neither) whether each finds itself. Refused
    in one line when they disagree. Without corpus text, or without a teacher to encode (encode_documents None),
    only the scan and the id checks run: index_verified false, said so."""
    where = f"index at {index.path}"
    if not corpus:
        record = scan(index, similarity, where) if index.readable else {"rows_scanned": 0}
        logger.warning("%s: no corpus text to re-encode; results say index_verified: false", where)
        return {"index_verified": False, "reason": "no corpus text", "checked": _said(record, 0), **record}
    ids = sorted(corpus)
    corpus_rows = index.rows_of(ids)
    present = sum(r is not None for r in corpus_rows)
    if not present:
        raise UsageError(
            f"{where} holds none of the corpus's {len(corpus)} document ids (e.g. {ids[0]!r}); is it this collection's"
            "?"
        )
    missing = len(corpus) - present
    share = present / len(corpus)
    example = next((d for d, r in zip(ids, corpus_rows) if r is None), None)  # a missing id, shown with repr
    if missing and share < 1 - PARTIAL_SHARE and not allow_partial:
        raise UsageError(
            f"{where} holds {present} of the corpus's {len(corpus)} documents ({share:.1%}; e.g. {example!r} is "
            "missing): fewer distractors make every number easier. Index them all, or pass --allow_partial_index"
        )
    readable = index.readable
    record = scan(index, similarity, where) if readable else {"rows_scanned": 0}
    record.update(corpus_docs_missing=missing, corpus_share_indexed=round(share, 4))
    if encode_documents is None:  # a teacher known only by its vectors: nothing can be re-encoded
        record["checked"] = _said(record, 0)
        return {"index_verified": False, "reason": "no teacher model", **record}
    rows = sample_rows(corpus_rows, seed)
    sample = [index.ids[r] for r in rows]
    fresh = np.asarray(encode_documents(sample), np.float32)
    record["sample"] = len(sample)
    subject = f"{where} does not match teacher {teacher_name}"
    hint = "was it built with another model, prompt or max length, or are its ids in another order?"
    q = search.unit(fresh) if similarity == "cosine" else fresh
    roundtrip = None if index.exact else _as_coded(index, q)
    if roundtrip is not None or readable:  # stored originals are readable too
        stored = index.vectors(rows)
        if index.exact:
            method, what, floor, against = "vectors", f"over {len(sample)} documents", MIN_FLOOR, fresh
        elif roundtrip is not None:
            method, floor, against = "codes", CODES_MIN_FLOOR, roundtrip
            what = f"of its codes to those of {len(sample)} re-encoded documents"
        else:
            method, what, floor, against = "decoded vectors", f"over {len(sample)} documents", CODES_MIN_FLOOR, fresh
        median, low = check_cosines(stored, against, subject, what, hint, floor)
        record.update(method=f"cosine of stored to re-encoded {method}", median_cosine=median, min_cosine=low)
        if method == "codes" and similarity == "cosine" and index.metric in ("ip", "l2"):
            _check_code_norms(stored, against, where)
        if similarity == "dot":
            record["max_norm_difference"] = check_dot_norms(stored, fresh, f"{where}: stored vector", teacher_name)
    else:  # no vectors and no standalone codec: does each sampled document find itself?
        _, top = index.search(q, SELF_TOP_K, similarity == "cosine")
        found = float(np.mean([r in t for r, t in zip(rows, top.tolist())]))
        record.update(method=f"own document in its top-{SELF_TOP_K} (a {index.faiss_type} stores codes)")
        record["self_found"] = found
        if not (found >= SELF_FLOOR):
            raise UsageError(
                f"{where} does not match teacher {teacher_name}: only {found:.0%} of {len(sample)} re-encoded "
                f"documents find themselves in its top-{SELF_TOP_K} ({SELF_FLOOR:.0%} needed); was it built "
                "with another model or prompt, or are its ids in another order?"
            )
    if missing:
        logger.warning("%s: %d corpus documents are not in the index (e.g. %r)", where, missing, example)
    record["checked"] = _said(record, len(sample))
    logger.info("%s matches %s (%s)", where, teacher_name, record["checked"])
    return {"index_verified": True, **record}


def _check_code_norms(stored, coded_units, where: str) -> None:
    """Stored codes of a cosine teacher's index searched as built must decode to the norms the codec gives unit
    vectors (cosine alone is blind to scale: codes of rows x3 pass it), row by row on the sample."""
    ratio = np.abs(np.linalg.norm(stored, axis=1) / np.maximum(np.linalg.norm(coded_units, axis=1), 1e-12) - 1)
    if not (np.median(ratio) <= CODES_NORM_TOLERANCE / 2 and np.max(ratio) <= CODES_NORM_TOLERANCE * 4):
        raise UsageError(
            f"{where}: its codes decode to norms up to {np.max(ratio):.0%} away from the codes of unit vectors "
            f"({int(np.sum(ratio > CODES_NORM_TOLERANCE))} of {len(ratio)} sampled rows); a cosine teacher's index "
            "searched as built must code unit vectors (faiss.normalize_L2 before add)"
        )


def _said(record: dict, sample: int) -> str:
    """What the check did, in words, for the result and the table."""
    parts = []
    if sample:
        parts.append(f"{sample} documents re-encoded ({record.get('method', '')}, stratified, first and last rows)")
    if record.get("rows_scanned"):
        parts.append(f"all {record['rows_scanned']} rows {record['rows']}")
    else:
        parts.append("stored rows not readable (codes without a decoder): not scanned")
    return "; ".join(parts)


def _as_coded(index, vectors: np.ndarray) -> np.ndarray | None:
    """The vectors as the index would store them (its own encoder, then decoded), or None when it has no
    standalone codec; an HNSW index codes with its storage."""
    import faiss

    if getattr(index, "index", None) is None:
        return None
    codec = faiss.downcast_index(index.index.storage) if isinstance(index.index, faiss.IndexHNSW) else index.index
    try:
        return codec.sa_decode(codec.sa_encode(np.ascontiguousarray(vectors, np.float32)))
    except RuntimeError:
        return None
