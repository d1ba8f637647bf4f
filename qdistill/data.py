"""Reading what users point the scripts at: query files, BEIR folders, corpora and collections; the text
normalisation that decides when two queries are the same (the leak guard).

Every reader checks its input first and turns a bad file into one line naming the file, the line and the fix.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
from pathlib import Path

from qdistill import cli
from qdistill.cli import UsageError

logger = logging.getLogger(__name__)

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{}.zip"
CQADUPSTACK_FORUMS = [
    "android",
    "english",
    "gaming",
    "gis",
    "mathematica",
    "physics",
    "programmers",
    "stats",
    "tex",
    "unix",
    "webmasters",
    "wordpress",
]


# ----------------------------------------------------------------------------- query files


def _rows(path: Path):
    """(line number, id, text) of a tsv (id<TAB>text), BEIR jsonl ({"_id", "text"}) or txt (one per line) file."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if path.suffix == ".jsonl":
                    try:
                        obj = json.loads(line)
                        yield lineno, str(obj["_id"]), obj
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise UsageError(
                            f"{path}:{lineno}: malformed jsonl line ({e.__class__.__name__}); "
                            'each line must be {"_id": ..., "text": ...}'
                        ) from e
                elif path.suffix == ".tsv":
                    cols = line.split("\t")
                    if len(cols) != 2:
                        raise UsageError(f"{path}:{lineno}: expected 'id<TAB>text', found {len(cols)} columns")
                    yield lineno, cols[0], {"text": cols[1]}
                else:
                    yield lineno, f"{path.stem}-{lineno}", {"text": line}
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text ({e.reason}); convert it to UTF-8") from e
    except OSError as e:
        raise UsageError(f"cannot read {path} ({e.strerror}); check its permissions") from e


def read_records(path: str | Path, what: str = "query file") -> dict[str, dict]:
    """{id: record} of a tsv/jsonl/txt file; a duplicate id or a record without text is an error."""
    path = cli.check_file(path, what, "pass an existing tsv/jsonl/txt file")
    out: dict[str, dict] = {}
    for lineno, rid, obj in _rows(path):
        if not isinstance(obj.get("text"), str):
            raise UsageError(f'{path}:{lineno}: no "text" string; each line must be {{"_id": ..., "text": ...}}')
        if rid in out:
            raise UsageError(f"{path}:{lineno}: duplicate id {rid!r}; ids must be unique in the file")
        out[rid] = obj
    return out


def read_queries(path: str | Path) -> dict[str, str]:
    """{id: text} of a query file (tsv id<TAB>text, BEIR queries.jsonl, or one query per line)."""
    return {k: v["text"] for k, v in read_records(path).items()}


def normalise(text: str) -> str:
    """The form in which two query texts count as the same: whitespace collapsed, lower-cased."""
    return " ".join(str(text).split()).lower()


def text_hash(text: str) -> str:
    """16-hex sha256 digest of the normalised text: how the leak guard compares texts without storing them."""
    import hashlib

    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()[:16]


def text_hashes(texts) -> list[str]:
    """Sorted digests (text_hash) of the texts: what a student trained on, without the texts."""
    return sorted({text_hash(t) for t in texts})


def clean_queries(texts) -> list[str]:
    """Strip, drop empties and de-duplicate (case-insensitively), keeping first-seen order."""
    seen, out = set(), []
    for t in texts:
        t = " ".join(str(t).split())
        if t and normalise(t) not in seen:
            seen.add(normalise(t))
            out.append(t)
    return out


def query_texts(spec: str, data_dir: str | Path) -> list[str]:
    """Non-empty texts of a query file, or of a BEIR dataset's queries (name or folder): what serving.py and
    evaluate_speed.py read their real queries from."""
    path = Path(spec)
    queries = read_queries(path if path.is_file() else dataset_path(spec, data_dir) / "queries.jsonl")
    texts = [t for t in (" ".join(q.split()) for q in queries.values()) if t]
    if not texts:
        raise UsageError(f"no non-empty queries in {spec}; pass a file or dataset with queries")
    return texts


# ----------------------------------------------------------------------------- BEIR data


def dataset_path(name_or_path: str, data_dir: str | Path) -> Path:
    """A BEIR folder: an existing path, <data_dir>/<name>, or the official download into data_dir."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    if p.exists():
        raise UsageError(
            f"dataset {name_or_path} is a file, expected a BEIR folder (corpus.jsonl, queries.jsonl, "
            "qrels/) or a BEIR name"
        )
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
            f"dataset {name_or_path!r} not under {data_dir} and its download failed "
            f"({e.__class__.__name__}); point --data_dir at a folder holding it, or pass the BEIR "
            "folder's path"
        ) from e


def expand_datasets(names, data_dir, allow_files=False) -> list[tuple[str, Path, str | None]]:
    """(display name, folder, group) per dataset; cqadupstack expands to its 12 forums (group = cqadupstack).

    Two folders with the same basename get distinct display names (name, name~2, ...), so neither is lost.
    allow_files: a collection file (pid<TAB>text tsv, or a corpus.jsonl) is a dataset too, named by its stem.
    """
    out = []
    for name in names:
        if allow_files and Path(name).is_file():
            out.append((Path(name).stem if Path(name).name != "corpus.jsonl" else None, Path(name), None))
            continue
        if Path(name).name == "cqadupstack":
            root = dataset_path(name, data_dir)
            out += [(f"cqadupstack-{f}", root / f, "cqadupstack") for f in CQADUPSTACK_FORUMS]
            continue
        out.append((None, dataset_path(name, data_dir), None))
    shown = display_names(
        [(folder.parent.name if folder.is_file() else folder.name) if d is None else d for d, folder, _ in out]
    )
    return [(d, folder, group) for d, (_, folder, group) in zip(shown, out)]


def display_names(names: list[str]) -> list[str]:
    """Result names of datasets: a repeated basename gets name~2, name~3, ... (evaluate_retrieval.py and
    report.py both name result files this way, so a second folder never reads the first one's table)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}~{seen[name]}")
    return out


def check_beir(folder: Path, split: str, corpus: bool = True) -> list[Path]:
    """The files a BEIR split needs, checked to exist (the data hashes and the loader read them); corpus=False:
    the documents are in an index the user gave (--doc_index), so corpus.jsonl may be absent."""
    files = [folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels" / f"{split}.tsv"]
    needs = f"a BEIR folder needs {'corpus.jsonl, ' if corpus else ''}queries.jsonl, qrels/{split}.tsv"
    for f in files[0 if corpus else 1 :]:
        cli.check_file(f, "BEIR file", needs)
    return files


def _beir_loader(folder: Path, split: str = "test"):
    from beir.datasets.data_loader import GenericDataLoader

    loader = GenericDataLoader(data_folder=str(folder))
    loader.qrels_file = str(folder / "qrels" / f"{split}.tsv")
    return loader


def load_beir(folder: str | Path, split: str = "test", corpus_optional: bool = False):
    """(corpus, judged queries, qrels, stats) of a BEIR folder, every file checked before beir's loader reads it.

    Qrels rows naming unknown queries or docs are dropped with a warning (and counted). corpus_optional: the
    documents live in an index the user gave; without corpus.jsonl the corpus is None and qrels documents are
    checked against that index's ids instead.
    """
    folder = Path(folder)
    c_file, q_file, qrels_file = check_beir(folder, split, corpus=not corpus_optional)
    corpus = load_corpus(folder)[0] if c_file.is_file() else None
    read_records(q_file)  # malformed lines and duplicate ids: one line naming them (beir keeps the last silently)
    loader = _beir_loader(folder, split)
    loader._load_queries()
    all_queries = loader.queries
    if not all_queries:
        raise UsageError(f"{q_file} holds no queries; fix the file or re-download the dataset")
    qrels = read_qrels(qrels_file)
    unknown_q = sum(q not in all_queries for q in qrels)
    clean = {
        q: {d: s for d, s in r.items() if corpus is None or d in corpus} for q, r in qrels.items() if q in all_queries
    }
    unknown_d = sum(len(qrels[q]) - len(r) for q, r in clean.items())
    clean = {q: r for q, r in clean.items() if r}
    # a query with no positive judgment can only score 0: averaged in, it would pull every model down alike
    no_positive = sorted(q for q, r in clean.items() if max(r.values()) <= 0)
    clean = {q: r for q, r in clean.items() if max(r.values()) > 0}
    if unknown_q or unknown_d:
        logger.warning(
            "%s: dropped qrels naming %d unknown queries and %d unknown docs", folder.name, unknown_q, unknown_d
        )
    if no_positive:
        logger.warning("%s: left out %d queries with no positive judgment", folder.name, len(no_positive))
    if not clean:
        raise UsageError(
            f"{qrels_file}: no judged queries left (ids match no query/document, or no score > 0); check the file"
        )
    queries = {q: all_queries[q] for q in clean}
    stats = {
        "unknown_qrels_queries": unknown_q,
        "unknown_qrels_docs": unknown_d,
        "queries_without_positive": len(no_positive),
    }
    return corpus, queries, clean, stats


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """{query id: {doc id: score}} of a BEIR qrels tsv (header optional), each bad line named."""
    qrels: dict[str, dict[str, int]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL), 1):
                if not row or (lineno == 1 and not row[-1].lstrip("-").isdigit()):
                    continue  # blank line or header
                if len(row) != 3 or not row[2].lstrip("-").isdigit():
                    raise UsageError(f"{path}:{lineno}: expected 'query-id<TAB>corpus-id<TAB>score' (integer)")
                qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text ({e.reason}); convert it to UTF-8") from e
    return qrels


def load_corpus(path: str | Path) -> tuple[dict, Path]:
    """A corpus alone: a BEIR folder (its corpus.jsonl) or an MS MARCO-style collection tsv (pid<TAB>text)."""
    path = Path(path)
    file = path / "corpus.jsonl" if path.is_dir() else path
    cli.check_file(file, "corpus", "pass a BEIR folder or a collection tsv (pid<TAB>text)")
    records = read_records(file, "corpus")  # malformed lines and duplicate ids: one line naming them
    if file.name == "corpus.jsonl":
        del records
        loader = _beir_loader(file.parent)
        loader._load_corpus()
        corpus = loader.corpus
    else:
        corpus = {k: {"title": "", "text": v["text"]} for k, v in records.items()}
    if not corpus:
        raise UsageError(f"corpus {file} holds no documents")
    return corpus, file
