"""faiss, used directly: exact and approximate inner-product indexes over the teacher's document embeddings."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from qdistill import cli, run_files


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosine_rows(a, b) -> np.ndarray:
    """Cosine of each row of a with the same row of b."""
    return (unit(a) * unit(b)).sum(1)


# the metrics a backend may rank by, and what its scores are
METRICS = {"ip": "inner product", "cosine": "cosine", "l2": "squared L2 distance (lower is better)"}


def to_similarity(scores: np.ndarray, rows: np.ndarray, metric: str, where: str) -> np.ndarray:
    """The one conversion from a backend's scores to similarities (higher is better), for faiss, .npy, Milvus and
    any backend added later. Inner product and cosine are similarities already; faiss and Milvus L2 return
    squared distances in ascending order, which over unit vectors (a cosine teacher's, checked beforehand) rank as
    cosine: |q - d|^2 = 2 - 2 cos. The order is checked: a backend whose results do not come best first is an
    error, never silently re-ranked."""
    scores = np.asarray(scores, np.float32)
    if metric not in METRICS:
        raise cli.UsageError(f"{where} ranks by {metric!r}; known metrics: {', '.join(METRICS)}")
    sims = 1 - scores / 2 if metric == "l2" else scores
    valid = rows >= 0  # padding (-1 rows) sits at the end of a row
    worse = np.where(valid[:, 1:], sims[:, 1:], -np.inf) > np.where(valid[:, :-1], sims[:, :-1], np.inf) + 1e-4
    if worse.any():
        q = int(np.flatnonzero(worse.any(1))[0])
        raise cli.UsageError(
            f"{where} returned results for query {q} that are not best first by {METRICS[metric]}; "
            "is its metric what it declares?"
        )
    return np.where(valid, sims, -np.inf).astype(np.float32)


# ivfpq learns coarse centroids and product-quantizer codebooks from the documents: below this it cannot train
# (faiss needs at least 2^nbits points) and would be worse than exact search anyway
IVFPQ_MIN_DOCS = 256


# how hnsw/ivfpq indexes are built here: part of a cached index file's key, so a changed setting builds anew
BUILD = {
    "hnsw": {"M": 32, "efConstruction": 200, "efSearch": 128},
    "ivfpq": {"nlist": "4 sqrt(n), <= n/39", "m": "dim/8", "nbits": "<= 8", "train": 100_000, "nprobe": "nlist/8"},
}


def check_index_size(kind: str, num_docs: int, name: str) -> None:
    if kind == "ivfpq" and num_docs < IVFPQ_MIN_DOCS:
        raise cli.UsageError(
            f"--index ivfpq needs at least {IVFPQ_MIN_DOCS} documents to train, {name} has {num_docs}; "
            "use --index flat (exact) or hnsw"
        )


def build_faiss(
    doc_emb: np.ndarray, kind: str = "flat", seed: int = 42, chunk: int = 100_000, normalize=False, gpu: bool = True
):
    """A faiss inner-product index over doc embeddings; normalize=True (cosine teachers) works chunk by chunk.
    gpu=False keeps a flat index on the CPU even where faiss-gpu sees a GPU (one to be written to a file)."""
    import faiss

    n, dim = doc_emb.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        hnsw = BUILD["hnsw"]
        index = faiss.IndexHNSWFlat(dim, hnsw["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = hnsw["efConstruction"], hnsw["efSearch"]
    else:  # ivfpq: nlist ~ 4 sqrt(n), bounded so each list gets enough training points
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))
        m = next(m for m in (dim // 8, dim // 12, dim // 16, 8, 4, 2, 1) if m and dim % m == 0)
        nbits = int(min(8, max(1, np.floor(np.log2(max(n / 39, 2))))))
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
        sample = np.ascontiguousarray(
            doc_emb[np.sort(np.random.default_rng(seed).choice(n, min(n, 100_000), replace=False))]
        )
        index.train(unit(sample) if normalize else sample.astype(np.float32))
        index.nprobe = max(1, nlist // 8)
    if gpu and kind == "flat" and hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)  # faiss-gpu installed and a GPU visible: search there
    for start in range(0, n, chunk):  # add in chunks: the memmap never needs to be fully in RAM
        block = np.ascontiguousarray(doc_emb[start : start + chunk], dtype=np.float32)
        index.add(unit(block) if normalize else block)
    return index


def cached_faiss(doc_emb, kind: str, folder, seed: int = 42, normalize=False):
    """An hnsw/ivfpq index, trained and built once, written with faiss's own serialization beside the teacher
    embeddings it indexes, and read back after (exact search is search.exact_search over the vectors)."""
    import faiss

    key = {"kind": kind, "seed": seed, "normalize": normalize, "build": BUILD[kind], "faiss": faiss.__version__}
    path = Path(folder) / f"{kind}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.faiss"
    if path.exists():
        index = faiss.read_index(str(path))
    else:
        index = build_faiss(doc_emb, kind, seed, normalize=normalize)
        with run_files.atomic_file(path) as tmp:
            faiss.write_index(index, str(tmp))
    if kind == "hnsw":  # search-time settings, set again after reading
        index.hnsw.efSearch = BUILD["hnsw"]["efSearch"]
    else:
        index.nprobe = max(1, index.nlist // 8)
    return index


def search(index, q_emb: np.ndarray, k: int):
    """Top-k (scores, row ids); k is capped at the index size, as faiss pads with id -1 beyond it."""
    return index.search(np.ascontiguousarray(q_emb, dtype=np.float32), min(k, index.ntotal))


def exact_search(q_emb: np.ndarray, chunks, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scores, row ids) of each query's k best documents by exact inner product, over (start row, block) chunks
    of the documents (normalize: unit blocks first, for cosine teachers).

    Memory stays at one chunk of documents plus (queries x 2k) candidates, whatever the corpus size. Each chunk is
    searched by a faiss IndexFlatIP, so the scores are the ones an index over the whole corpus gives.
    """
    import faiss

    q = unit(q_emb) if normalize else np.ascontiguousarray(q_emb, dtype=np.float32)
    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    for start, block in chunks:
        block = np.ascontiguousarray(block, dtype=np.float32)
        index = faiss.IndexFlatIP(block.shape[1])
        index.add(unit(block) if normalize else block)
        s, i = index.search(q, min(k, len(block)))
        best_s, best_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i + start], 1)
        if best_s.shape[1] > k:
            order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
            best_s, best_i = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
    return best_s, best_i


def array_chunks(doc_emb, rows: int = 131_072):
    """(start row, block) over an in-memory or memory-mapped array."""
    for start in range(0, len(doc_emb), rows):
        yield start, doc_emb[start : start + rows]


def exact_top_k(q_emb: np.ndarray, doc_emb: np.ndarray, k: int, normalize: bool) -> np.ndarray:
    """Row ids of each query's k best documents by exact inner product, chunk by chunk (exact_search)."""
    return exact_search(q_emb, array_chunks(doc_emb), min(k, len(doc_emb)), normalize)[1]
