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
        texts = {}
        for f in query_files:
            texts.update(read_queries(f))
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
        """Re-encode a seeded sample of logged queries with the teacher; refuse the log when they disagree."""
        texts = sorted(self.at)
        rng = np.random.default_rng(seed)
        sample = [texts[i] for i in sorted(rng.choice(len(texts), min(index_check.SAMPLE, len(texts)), replace=False))]
        stored = self.rows.vectors([self.at[t] for t in sample])
        fresh = np.asarray(encode_queries(sample), np.float32)
        if stored.shape[1] != fresh.shape[1]:
            raise UsageError(
                f"logged query vectors {self.path} are {stored.shape[1]}-d but teacher {teacher_name} gives "
                f"{fresh.shape[1]}-d; were they logged from another model?"
            )
        subject = f"logged query vectors {self.path} do not match teacher {teacher_name}"
        hint = "were they logged with another model, query prompt or max length, or in another row order?"
        median, low = index_check.check_cosines(stored, fresh, subject, f"over {len(sample)} queries", hint)
        if similarity == "dot":
            index_check.check_dot_norms(stored, fresh, f"logged query vectors {self.path}:", teacher_name)
        self.verification = {"sample": len(sample), "median_cosine": median, "min_cosine": low}
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
