"""The teacher's query vectors as the user logged them, used as distillation labels without a teacher pass.

A `.npy` (float32 or float16) aligned with a query file: row i is the query with the i-th id of an ids file, or,
without one, the i-th query of the single --train_queries file. Before training, a seeded sample of those queries
is re-encoded with the teacher (its query prompt, the run's max length) and compared with the logged rows; a log
made by another model or prompt is refused in one line. Texts the log lacks (corpus spans, other files) are
labelled by the teacher as usual.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from qdistill import given_index, index_check
from qdistill.cli import UsageError
from qdistill.data import read_queries

logger = logging.getLogger(__name__)


class QueryLog:
    """Logged teacher query vectors, looked up by (whitespace-collapsed) query text."""

    def __init__(self, vectors: Path, ids_file: Path | None, query_files: list[Path]):
        texts, origin = {}, {}
        for f in query_files:
            for qid, text in read_queries(f).items():
                if qid in texts and " ".join(texts[qid].split()) != " ".join(text.split()):
                    raise UsageError(
                        f"query id {qid!r} is in both {origin[qid]} and {f} with different texts; the logged vector "
                        "of that id would label the wrong one: give the files distinct ids"
                    )
                texts[qid], origin[qid] = text, f
        if ids_file is None:
            if len(query_files) != 1:
                raise UsageError(
                    "--teacher_query_embeddings without --teacher_query_ids follows the row order of one query "
                    f"file, but --train_queries names {len(query_files)}; pass --teacher_query_ids"
                )
            ids = list(texts)
            self.rows = given_index.open_npy(Path(vectors), ids)
        else:
            self.rows = given_index.open_npy(Path(vectors), given_index.read_ids(Path(ids_file)))
        unknown = [i for i in self.rows.ids if i not in texts]
        if len(unknown) == len(self.rows.ids):
            raise UsageError(f"none of the ids of {vectors} is a query id of {[str(f) for f in query_files]}")
        if unknown:
            logger.warning("%d logged query ids are not in the query files; those rows are unused", len(unknown))
        self.at: dict[str, int] = {}
        for row, qid in enumerate(self.rows.ids):
            if qid in texts:
                self.at.setdefault(" ".join(texts[qid].split()), row)
        self.path, self.verification = Path(vectors), {}

    def verify(self, encode_queries, similarity: str, teacher_name: str, seed: int) -> dict:
        """Every logged row read (finite, non-zero for a cosine teacher: index_check.scan), then a sample of
        logged queries, stratified over the file and holding its first and last used rows, re-encoded with the
        teacher; the log is refused in one line when they disagree."""
        subject = f"logged query vectors {self.path}"
        scanned = index_check.scan(self.rows, similarity, subject)
        text_of = {row: text for text, row in self.at.items()}
        rows = index_check.sample_rows(list(text_of), seed)
        sample = [text_of[r] for r in rows]
        stored = self.rows.vectors(rows)
        fresh = np.asarray(encode_queries(sample), np.float32)
        if stored.shape[1] != fresh.shape[1]:
            raise UsageError(
                f"logged query vectors {self.path} are {stored.shape[1]}-d but teacher {teacher_name} gives "
                f"{fresh.shape[1]}-d; were they logged from another model?"
            )
        hint = "were they logged with another model, query prompt or max length, or in another row order?"
        median, low = index_check.check_cosines(
            stored, fresh, f"{subject} do not match teacher {teacher_name}", f"over {len(sample)} queries", hint
        )
        if similarity == "dot":
            index_check.check_dot_norms(stored, fresh, f"{subject}:", teacher_name)
        self.verification = {"sample": len(sample), "median_cosine": median, "min_cosine": low, **scanned}
        logger.info("logged query vectors %s match %s (median cosine %.4f)", self.path, teacher_name, median)
        return self.verification

    def lookup(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """(float32 vectors of the texts the log holds (other rows zero), indexes of the texts it lacks)."""
        rows = [self.at.get(" ".join(t.split())) for t in texts]
        have = [i for i, r in enumerate(rows) if r is not None]
        out = np.zeros((len(texts), self.rows.dim), np.float32)
        if have:
            order = np.argsort([rows[i] for i in have], kind="stable")  # the file is read front to back
            picked = [have[j] for j in order]
            out[picked] = self.rows.vectors([rows[i] for i in picked])
        return out, [i for i, r in enumerate(rows) if r is None]
