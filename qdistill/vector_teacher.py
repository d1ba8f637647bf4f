"""A teacher known only by its vectors (an embedding API, an LLM embedder): the logged query vectors and the document
index are all there is, so nothing is re-encoded. What stands in for the model where the toolkit asks one: its
dimension, its score function (declared, or read from the vectors' norms), and its query vectors looked up by text.

Matryoshka (MRL) truncation lives here too: the first d dimensions of every vector, renormalised for a cosine
teacher, wherever vectors meet (labels, index rows, students' outputs).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from qdistill import index_check, search
from qdistill.cli import UsageError

logger = logging.getLogger(__name__)

# a cosine teacher's vectors are unit length (APIs return them so); a log whose rows all are is read as cosine
UNIT_TOLERANCE = 1e-2
# the logged queries must find documents better than the same vectors with their coordinates shuffled: a log of
# another model (another space) ranks no better than that. Rows in another order stay queries of this space and
# pass: only the teacher's own nDCG@10, printed in every table, shows them
NULL_MARGIN = 1.2
CHECK_QUERIES = 64


def truncate(vectors: np.ndarray, dim: int | None, cosine: bool) -> np.ndarray:
    """The first `dim` dimensions (Matryoshka), renormalised for a cosine teacher; as they are without dim."""
    vectors = np.asarray(vectors, np.float32)
    if dim is None or dim == vectors.shape[1]:
        return vectors
    return search.unit(vectors[:, :dim]) if cosine else np.ascontiguousarray(vectors[:, :dim])


def check_truncation(dim: int | None, full: int, what: str) -> None:
    if dim is not None and dim > full:
        raise UsageError(f"--truncate_dim {dim} is larger than the {full}-d {what}; give d <= {full}")


def similarity_of(scanned: dict, declared: str | None, subject: str) -> str:
    """The teacher's score function: the declared one, else cosine when every scanned row is unit length; a log
    of other norms must be declared (a dot-product teacher's norms carry its scores)."""
    unit = abs(scanned["norm_min"] - 1) <= UNIT_TOLERANCE and abs(scanned["norm_max"] - 1) <= UNIT_TOLERANCE
    if declared == "cosine" or (declared is None and unit):
        return "cosine"
    if declared == "dot":
        return "dot"
    raise UsageError(
        f"{subject}: norms from {scanned['norm_min']:.3g} to {scanned['norm_max']:.3g}, so the teacher's score "
        "function cannot be read from them; declare it with --teacher_similarity dot (or cosine)"
    )


class VectorTeacher:
    """The teacher where the toolkit asks for a model: dimension, score function, no prompts (the logged vectors
    already carry the teacher's), a Normalize module when cosine (encoders.normalizes reads modules), no weights."""

    def __init__(self, name: str, dim: int, similarity: str):
        from sentence_transformers.models import Normalize

        self.name, self.dim, self.similarity_fn_name = name, dim, similarity
        self.prompts, self.default_prompt_name, self.max_seq_length = {}, None, None
        self.modules = [Normalize()] if similarity == "cosine" else []

    def __iter__(self):
        return iter(self.modules)

    def get_embedding_dimension(self) -> int:
        return self.dim


class LoggedEncoder(VectorTeacher):
    """One dataset's logged teacher query vectors, served by encode_query as if the teacher encoded them."""

    meta = None

    def __init__(self, name: str, log, similarity: str):
        super().__init__(name, log.rows.dim, similarity)
        self.log = log

    def encode_query(self, texts, **_) -> np.ndarray:
        emb, missing = self.log.lookup(list(texts))
        if missing:  # every evaluated query's id is checked to be in the log before any work (open_log)
            raise UsageError(f"{len(missing)} queries have no logged teacher vector (e.g. {texts[missing[0]]!r})")
        return emb


def open_log(vectors: str | Path, ids: str | Path, query_file: Path, queries: dict[str, str], subject: str):
    """A dataset's logged query vectors (QueryLog), every evaluated query's id in it (scan_log reads its rows)."""
    from qdistill.query_log import QueryLog

    log = QueryLog(Path(vectors), Path(ids), [query_file])
    logged = set(log.rows.ids)
    missing = [q for q in queries if q not in logged]
    if missing:
        raise UsageError(
            f"{subject}: {len(missing)} of the {len(queries)} evaluated queries have no row in {vectors} "
            f"(e.g. id {missing[0]!r}); log the teacher's vectors of every query evaluated"
        )
    return log


def scan_log(log, declared: str | None) -> str:
    """Every logged row read (finite; norms recorded on log.verification) and the teacher's score function:
    declared, or read from those norms (similarity_of)."""
    subject = f"logged query vectors {log.path}"
    log.verification = {**index_check.scan(log.rows, "dot", subject), "teacher": "vectors only"}
    return similarity_of(log.verification, declared, subject)


def check_against_index(log, index, queries: dict[str, str], similarity: str, dim, seed: int) -> dict:
    """What can be checked of logged query vectors and an index without the teacher (their dimensions are checked
    by the caller): the logged queries, cut to `dim`, find documents far better than the same vectors with shuffled
    coordinates (a log of another model does not). Returns the record kept with every result."""
    cosine = similarity == "cosine"
    rng = np.random.default_rng(seed)
    ids = sorted(queries)
    pick = sorted(rng.choice(len(ids), min(CHECK_QUERIES, len(ids)), replace=False).tolist())
    q = truncate(log.lookup([queries[ids[i]] for i in pick])[0], dim, cosine)
    shuffled = np.stack([row[rng.permutation(len(row))] for row in q])
    chunks = ((s, truncate(b, dim, cosine)) for s, b in index.chunks())
    real = search.exact_search(q, chunks, 1, cosine)[0][:, 0]
    chunks = ((s, truncate(b, dim, cosine)) for s, b in index.chunks())
    null = search.exact_search(shuffled, chunks, 1, cosine)[0][:, 0]
    real_median, null_median = float(np.median(real)), float(np.median(null))
    if not (real_median >= NULL_MARGIN * null_median if null_median > 0 else real_median > null_median):
        raise UsageError(
            f"logged query vectors {log.path} do not look like queries of the index {index.path}: median top-1 "
            f"score {real_median:.3f}, no better than the same vectors with shuffled coordinates "
            f"({null_median:.3f}); were they logged from another model or version than the index?"
        )
    return {
        "sample": len(pick),
        "median_top1_score": round(real_median, 4),
        "median_top1_score_shuffled": round(null_median, 4),
    }


def vectors_only_index_record(record: dict, log_check: dict) -> dict:
    """The result's record of an index checked without its teacher (index_check.verify with nothing to encode,
    and check_against_index): what could be seen, and that nothing was verified by re-encoding."""
    scanned = f"all {record['rows_scanned']} rows {record['rows']}" if record.get("rows_scanned") else "not scanned"
    said = (
        f"teacher as vectors only, nothing re-encoded: {scanned}; {log_check['sample']} logged queries' median "
        f"top-1 score {log_check['median_top1_score']:.3f} (shuffled {log_check['median_top1_score_shuffled']:.3f})"
    )
    return {**record, "teacher": "vectors only", "logged_queries": log_check, "checked": said}
