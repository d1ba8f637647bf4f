"""The expensive things, computed once and cached under output/, each keyed by everything that changes it.

One key function (`cache_key`) names teacher query labels, teacher document indexes (evaluation corpora and
--score_corpus alike) and the finished results of evaluate_retrieval.py. Writes are atomic.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from qdistill import encoders, run_files, torchrun

logger = logging.getLogger(__name__)
_FINGERPRINTS: dict = {}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_texts(texts) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def model_fingerprint(path: str | Path) -> str:
    """Content fingerprint of a model folder: every file hashed whole, names included.

    A partial hash (size, head, tail) misses retrained encoder weights in the middle of a safetensors file, so
    nothing is sampled. Memoized per (file, size, mtime) listing: a model retrained at the same path gets a new
    fingerprint even within one process, and an unchanged one is hashed once.
    """
    path = Path(path)
    if path.is_file():  # a teacher known by its vectors: the log file stands for the model
        return sha256_file(path)[:16]
    files = sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts)
    listing = tuple((p.as_posix(), p.stat().st_mtime_ns, p.stat().st_size) for p in files)
    if listing in _FINGERPRINTS:
        return _FINGERPRINTS[listing]
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(path).as_posix().encode() + b"\0")
        h.update(sha256_file(p).encode())
    _FINGERPRINTS[listing] = h.hexdigest()[:16]
    return _FINGERPRINTS[listing]


def encoder_settings(model, side: str, max_seq_length: int | None = None) -> dict:
    """The settings that change a model's embeddings on one side (query/document)."""
    prompt = encoders.input_prompt(model, side)
    return {
        "side": side,
        "max_seq_length": max_seq_length or model.max_seq_length,
        "prompt": prompt,
        "normalize": encoders.normalizes(model),
        "similarity": encoders.similarity_name(model),
    }


def cache_key(kind: str, model_path: str | Path, settings: dict) -> tuple[dict, str]:
    """(key, 16-hex digest) for a cached artifact: kind, model content, settings, data hashes, library versions."""
    key = {
        "kind": kind,
        "model_fingerprint": model_fingerprint(model_path),
        **settings,
        "sentence_transformers": __import__("sentence_transformers").__version__,
        "transformers": __import__("transformers").__version__,
    }
    return key, sha256_texts([json.dumps(key, sort_keys=True, default=str)])[:16]


# ----------------------------------------------------------------------------- sharding across ranks


def encode_sharded(encode, texts: list[str]) -> np.ndarray:
    """encode(texts), split across the ranks of a torchrun job: each encodes every world-th text, and all
    gather the rows back in order as tensors (all_gather_object would pickle the whole matrix on every rank).
    A plain call in a single process."""
    rank, world = torchrun.rank_world()
    if world == 1:
        return np.asarray(encode(texts), dtype=np.float32)
    import torch.distributed as dist

    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    part = torch.as_tensor(np.asarray(encode(texts[rank::world]), dtype=np.float32)).reshape(
        len(texts[rank::world]), -1
    )
    shapes = [torch.zeros(2, dtype=torch.long, device=dev) for _ in range(world)]
    dist.all_gather(shapes, torch.tensor(part.shape, dtype=torch.long, device=dev))
    dim, rows = max(int(s[1]) for s in shapes), -(-len(texts) // world)  # a rank with no texts has no width
    padded = torch.zeros((rows, dim), dtype=torch.float32, device=dev)
    padded[: part.shape[0]] = part.to(dev)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    out = np.empty((len(texts), dim), np.float32)
    for r, block in enumerate(gathered):
        out[r::world] = block[: len(range(r, len(texts), world))].cpu().numpy()
    return out


# ----------------------------------------------------------------------------- teacher query labels


def teacher_labels(teacher, teacher_path, texts, output_path, max_seq_length, batch_size=256, devices=None):
    """Teacher query embeddings (encode_query at max_seq_length), cached in fp16 under output/labels/.

    The folder is keyed by cache_key (teacher content, length, prompt, normalization); inside it each set is
    named by the hash of its texts, and a new set is served from any cached superset. Returns (labels, cached).
    """
    key, digest = cache_key("query_labels", teacher_path, encoder_settings(teacher, "query", max_seq_length))
    folder = Path(output_path) / "labels" / digest
    name = sha256_texts(texts)[:24]
    if (folder / f"{name}.texts.json").exists() and (folder / f"{name}.npy").exists():
        logger.info("reusing cached teacher labels %s (%d texts)", folder / name, len(texts))
        return np.load(folder / f"{name}.npy").astype(np.float32), True
    for other in sorted(folder.glob("*.texts.json")):
        npy = other.with_name(other.name.replace(".texts.json", ".npy"))
        try:  # a set is complete when both files read back and agree; anything else is skipped, not trusted
            cached = {t: i for i, t in enumerate(json.loads(other.read_text()))}
            emb = np.load(npy, mmap_mode="r")
        except (OSError, ValueError) as e:
            logger.warning("skipping incomplete cached label set %s (%s)", other.name, e.__class__.__name__)
            continue
        if emb.shape[0] == len(cached) and all(t in cached for t in texts):
            logger.info("serving %d labels from cached superset %s", len(texts), other.name)
            return np.asarray(emb[[cached[t] for t in texts]], dtype=np.float32), True
    t0 = time.perf_counter()
    pool = teacher.start_multi_process_pool(devices) if devices and len(devices) > 1 else None
    try:
        with encoders.max_length(teacher, max_seq_length), torch.inference_mode():
            emb = encode_sharded(
                lambda t: teacher.encode_query(t, batch_size=batch_size, pool=pool, show_progress_bar=True), texts
            )
    finally:
        if pool is not None:
            teacher.stop_multi_process_pool(pool)
    secs = time.perf_counter() - t0
    rank, world = torchrun.rank_world()
    if rank == 0:  # one writer: meta and the .npy first, the texts last (their presence means complete)
        logger.info("labelled %d texts in %.1fs (%.0f/s, %d process(es))", len(texts), secs, len(texts) / secs, world)
        run_files.write_json(folder / "key.json", key)
        run_files.write_json(folder / f"{name}.json", {"num_texts": len(texts), "seconds": round(secs, 2)})
        # fp32, as the fresh run trains on: a rerun from the cache trains on the very same targets
        with run_files.atomic_file(folder / f"{name}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, emb.astype(np.float32))
        run_files.write_json(folder / f"{name}.texts.json", texts)
    torchrun.barrier()
    return emb.astype(np.float32), False


# ----------------------------------------------------------------------------- teacher document index


def doc_text(doc: dict) -> str:
    # beir's DenseRetrievalExactSearch joins title and text with a space
    return (doc.get("title", "") + " " + doc.get("text", "")).strip()


def teacher_index(
    teacher,
    teacher_name,
    teacher_path,
    corpus,
    corpus_file,
    output_path,
    max_seq_length=None,
    batch_size=32,
    chunk_size=1024,
    devices=None,
):
    """The teacher's document embeddings of a corpus, built once and cached under output/index/.

    Keyed by cache_key (teacher content, corpus sha256, document length, prompt, normalization), so the same
    corpus at another length gets its own folder. Peak RAM is bounded by one chunk of embeddings: documents
    are encoded chunk_size at a time straight into a memmap. Returns (read-only memmap, doc ids, meta).
    """
    corpus_file = Path(corpus_file)
    # a BEIR folder's corpus.jsonl is named after its folder, a collection tsv after itself
    name = corpus_file.parent.resolve().name if corpus_file.name == "corpus.jsonl" else corpus_file.stem
    ids = sorted(corpus)
    texts = [doc_text(corpus[i]) for i in ids]
    settings = {
        "teacher": teacher_name,
        # what is encoded (ids and texts), not the file it came from: a part of a corpus gets its own key
        "corpus_content_sha256": sha256_texts(x for i, t in zip(ids, texts) for x in (i, t)),
        **encoder_settings(teacher, "document", max_seq_length),
    }
    key, digest = cache_key("document_index", teacher_path, settings)
    folder = Path(output_path) / "index" / run_files.slug(teacher_name) / f"{run_files.slug(name)}-{digest}"
    if (folder / "meta.json").exists():
        meta = json.loads((folder / "meta.json").read_text())
        logger.info("reusing teacher index %s (%d docs)", folder, meta["num_docs"])
        ids = json.loads((folder / "ids.json").read_text())
        return np.load(folder / "embeddings.npy", mmap_mode="r"), ids, {**meta, "folder": str(folder)}

    build_index(teacher, ids, texts, folder, key, name, max_seq_length, batch_size, chunk_size, devices)
    meta = json.loads((folder / "meta.json").read_text())
    logger.info("built teacher index %s: %d docs in %.1fs", folder, len(ids), meta["encode_seconds"])
    return np.load(folder / "embeddings.npy", mmap_mode="r"), ids, {**meta, "folder": str(folder)}


def build_index(teacher, ids, texts, folder, key, name, max_seq_length, batch_size, chunk_size, devices) -> None:
    """Encode the documents into folder/{embeddings.npy, ids.json, meta.json}, chunk by chunk into a memmap."""
    from tqdm.auto import tqdm

    # longest first in chunks: little padding per batch, and a progress bar that moves
    order = sorted(range(len(ids)), key=lambda i: -len(texts[i]))
    t0 = time.perf_counter()
    dim = teacher.get_embedding_dimension()
    pool = teacher.start_multi_process_pool(devices) if devices and len(devices) > 1 else None
    main = torchrun.rank_world()[0] == 0  # under torchrun every rank encodes a share of each chunk; rank 0 writes
    try:
        with run_files.atomic_dir(folder) if main else contextlib.nullcontext() as tmp:
            emb = (
                np.lib.format.open_memmap(tmp / "embeddings.npy", "w+", np.float32, (len(ids), dim)) if main else None
            )
            with tqdm(total=len(ids), desc=f"teacher index {name}", unit="doc", disable=not main) as bar:
                for start in range(0, len(ids), chunk_size):
                    rows = order[start : start + chunk_size]
                    with torch.inference_mode(), encoders.max_length(teacher, max_seq_length):
                        out = encode_sharded(
                            lambda t: teacher.encode_document(
                                t, batch_size=batch_size, pool=pool, show_progress_bar=False
                            ),
                            [texts[i] for i in rows],
                        )
                    if main:
                        emb[rows] = out
                    bar.update(len(rows))
            if main:
                emb.flush()
                del emb
                secs = time.perf_counter() - t0
                meta = {
                    "key": key,
                    "num_docs": len(ids),
                    "dim": dim,
                    "encode_seconds": round(secs, 2),
                    "docs_per_second": round(len(ids) / secs, 2),
                }
                run_files.write_json(tmp / "ids.json", ids)
                run_files.write_json(tmp / "meta.json", meta)
    finally:
        if pool is not None:
            teacher.stop_multi_process_pool(pool)
    torchrun.barrier()  # the other ranks read what rank 0 wrote
