"""Where training text comes from: query files, the MS MARCO train queries (downloaded once), published
Margin-MSE triples, perturbed queries, and query-like spans of a user's own documents (`corpus:` sources).

Reading files and BEIR folders is data.py's; this module decides what a student trains on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import tarfile
import tempfile
from pathlib import Path

from qdistill import cli, run_files
from qdistill.cli import UsageError
from qdistill.data import clean_queries, dataset_path, load_corpus, normalise, read_queries
from qdistill.teacher_outputs import sha256_file

logger = logging.getLogger(__name__)

MSMARCO_QUERIES_URL = "https://msmarco.z22.web.core.windows.net/msmarcoranking/queries.tar.gz"


def msmarco_train_queries(data_dir: str | Path) -> Path:
    """MS MARCO train queries: <data_dir>/msmarco/queries.train.tsv, downloaded once; offline, the local sample."""
    target = Path(data_dir) / "msmarco" / "queries.train.tsv"
    if target.exists():
        return target
    local = Path(data_dir) / "queries" / "msmarco-train-sample.tsv"
    try:
        from beir import util

        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # nothing half-downloaded stays behind
            util.download_url(MSMARCO_QUERIES_URL, str(Path(tmp) / "queries.tar.gz"))
            with tarfile.open(Path(tmp) / "queries.tar.gz") as tar:
                tar.extract("queries.train.tsv", tmp, filter="data")
            os.replace(Path(tmp) / "queries.train.tsv", target)
        return target
    except Exception as e:  # noqa: BLE001 - any download failure falls back to a local copy
        if local.exists():
            logger.warning("MS MARCO download failed (%s); using the local sample %s", e.__class__.__name__, local)
            return local
        raise UsageError(
            f"MS MARCO queries download failed ({e.__class__.__name__}) and no local copy at {local}; "
            "pass a query file to --train_queries or --data_dir holding queries/"
        ) from e


def train_and_dev_queries(files, dev_file=None, num_dev=1000, max_train=None, seed=42):
    """(train texts, dev texts); seeded, de-duplicated, dev disjoint from train."""
    texts = clean_queries(t for f in files for t in read_queries(f).values())
    if dev_file:
        dev = clean_queries(read_queries(dev_file).values())
        dev_keys = {t.lower() for t in dev}
        texts = [t for t in texts if t.lower() not in dev_keys]  # never train on the validation queries
    else:
        idx = list(range(len(texts)))
        random.Random(seed).shuffle(idx)
        n_dev = min(num_dev, len(texts) // 10)
        dev = [texts[i] for i in sorted(idx[:n_dev])]
        texts = [texts[i] for i in sorted(idx[n_dev:])]
    if max_train and len(texts) > max_train:
        texts = random.Random(seed + 1).sample(texts, max_train)
    if not texts:
        raise UsageError(
            f"no training queries left in {[str(f) for f in files]} after dropping empties/duplicates/dev"
        )
    if not dev:
        raise UsageError("no validation queries; pass --dev_queries FILE or more training queries")
    return texts, dev


def augment_queries(texts: list[str], n: int, mask_token: str, seed: int) -> list[str]:
    """n seeded perturbations per query (EmbedDistill 4.3): mask a word, drop a word, or swap two neighbours."""
    rng = random.Random(seed)
    out = []
    for t in texts:
        words = t.split()
        for _ in range(n):
            w = list(words)
            op = rng.choice(("mask", "drop", "swap")) if len(w) > 1 else "mask"
            i = rng.randrange(len(w))
            if op == "mask":
                w[i] = mask_token
            elif op == "drop":
                del w[i]
            else:
                j = i + 1 if i < len(w) - 1 else i - 1
                w[i], w[j] = w[j], w[i]
            out.append(" ".join(w))
    return out


def read_triples(path, query_files, collection_file, train_texts, max_n=None, seed=42):
    """Published Margin-MSE triples -> (query text per triple, passage texts, [pos row, neg row, margin] rows).

    Ids resolve through the query files and the collection (pid<TAB>text); triples whose query is not a
    training query (a validation query), or whose ids are unknown, are dropped and counted.
    """
    path = cli.check_file(path, "--margin_triples", "pass pos<TAB>neg<TAB>qid<TAB>pid_pos<TAB>pid_neg triples")
    id2q = {k: v for f in query_files for k, v in read_queries(f).items()}
    allowed = {t.lower() for t in train_texts}
    collection = read_queries(cli.check_file(collection_file, "--triples_collection", "pass pid<TAB>text"))
    rows, queries, pids, dropped = [], [], {}, 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            cols = line.rstrip("\n").split("\t")
            if len(cols) != 5:
                raise UsageError(f"{path}:{lineno}: expected pos_score<TAB>neg_score<TAB>qid<TAB>pid_pos<TAB>pid_neg")
            try:
                margin = float(cols[0]) - float(cols[1])
            except ValueError:
                raise UsageError(f"{path}:{lineno}: scores must be numbers") from None
            q = " ".join(id2q.get(cols[2], "").split())
            if q.lower() not in allowed or cols[3] not in collection or cols[4] not in collection:
                dropped += 1
                continue
            for p in cols[3:5]:
                pids.setdefault(p, len(pids))
            queries.append(q)
            rows.append([pids[cols[3]], pids[cols[4]], margin])
    if dropped:
        logger.warning("%s: dropped %d triples (validation query or unknown id)", path.name, dropped)
    if not rows:
        raise UsageError(f"{path}: no usable triples; check that its ids match --train_queries and the collection")
    if max_n and len(rows) > max_n:
        keep = sorted(random.Random(seed).sample(range(len(rows)), max_n))
        rows, queries = [rows[i] for i in keep], [queries[i] for i in keep]
    return queries, [collection[p] for p in pids], rows  # pids is insertion-ordered: row i = i-th pid


def corpus_source(spec: str, data_dir: str | Path) -> tuple[dict, Path, set[str]]:
    """(corpus, corpus file, its evaluation query texts lower-cased) for `corpus:<BEIR folder, name or tsv>`."""
    name = spec.split(":", 1)[1]
    path = Path(name)
    folder = path if path.is_file() else dataset_path(name, data_dir)
    corpus, file = load_corpus(folder)
    queries = file.parent / "queries.jsonl" if file.name == "corpus.jsonl" else None
    held_out = {normalise(q) for q in read_queries(queries).values()} if queries and queries.is_file() else set()
    return corpus, file, held_out


def sample_spans(
    corpus: dict, n: int, lengths: list[int], seed: int, title_share: float = 0.3, exclude=()
) -> list[str]:
    """n distinct query-like texts from documents: titles (title_share of them) and word windows.

    Window lengths are drawn from `lengths` (word counts of real queries); half the windows start at a
    sentence start, as queries rarely begin mid-sentence. Texts in `exclude` (lower-cased: evaluation and
    validation queries) are never returned. Seeded: the same arguments give the same texts.
    """
    rng = random.Random(seed)
    ids = sorted(corpus)
    seen, out = set(exclude), []
    for _ in range(20 * n):
        if len(out) == n:
            break
        doc = corpus[ids[rng.randrange(len(ids))]]
        title = " ".join((doc.get("title") or "").split())
        words = doc.get("text", "").split()
        if title and (rng.random() < title_share or not words):
            text = title
        elif words:
            size = min(len(words), rng.choice(lengths))
            starts = [0] + [i + 1 for i, w in enumerate(words[:-1]) if w.endswith((".", "?", "!"))]
            start = rng.choice(starts) if rng.random() < 0.5 else rng.randrange(len(words))
            start = min(start, len(words) - size)
            text = " ".join(words[start : start + size])
        else:
            continue
        if text and text.lower() not in seen:
            seen.add(text.lower())
            out.append(text)
    return out


def training_texts(
    query_files,
    corpora,
    dev_file=None,
    num_dev=1000,
    max_train=None,
    corpus_share=0.5,
    seed=42,
    span_words=None,
    title_share=0.3,
):
    """(train texts, dev texts, texts per source): real queries mixed with document text.

    corpora: (name, corpus, held-out query texts) per `corpus:` source. max_train counts all training texts;
    a corpus_share of them are sampled from the corpora (split evenly), the rest are queries. Without
    max_train, all queries are used and spans are added in proportion. Span lengths follow the training
    queries' word counts (or span_words = (min, max)); no span equals a validation or evaluation query.
    """
    share = corpus_share if corpora else 0.0
    if not query_files and not max_train:
        raise UsageError("training on document text alone needs --max_train_queries N (how many texts to sample)")
    train, dev, counts = [], [], {}
    if query_files:
        n_queries = None if max_train is None else max(1, round(max_train * (1 - share)))
        train, dev = train_and_dev_queries(query_files, dev_file, num_dev, n_queries, seed)
        counts["queries"] = len(train)
    elif dev_file:
        dev = clean_queries(read_queries(dev_file).values())
    n_spans = (max_train - len(train)) if max_train else round(len(train) * share / (1 - share))
    if max_train and query_files and share < 1 and len(train) < n_queries:
        # fewer queries than asked: the share of document text holds (fewer texts in all), never grows
        n_spans = round(len(train) * share / (1 - share))
        logger.warning(
            "%d training queries, not the %d that --max_train_queries %d with --corpus_text_share %.2f asks for: "
            "%d document spans keep the share, %d texts in all",
            len(train),
            n_queries,
            max_train,
            share,
            n_spans,
            len(train) + n_spans,
        )
    lengths = list(range(span_words[0], span_words[1] + 1)) if span_words else None
    lengths = lengths or [min(max(len(t.split()), 2), 32) for t in train] or list(range(4, 17))
    exclude = {t.lower() for t in train + dev}
    hold_out = not dev  # document text alone and no --dev_queries: validation spans are held out of the sample
    for i, (name, corpus, held_out) in enumerate(corpora):
        n = n_spans // len(corpora) + (i < n_spans % len(corpora))
        k = num_dev // len(corpora) if hold_out else 0
        spans = sample_spans(corpus, n + k, lengths, seed + 17 * (i + 1), title_share, exclude | held_out)
        if n and not spans[k:]:
            raise UsageError(f"{name}: its documents give no text to train on (empty titles and texts); check it")
        dev, spans = dev + spans[:k], spans[k:]
        exclude |= {s.lower() for s in spans}
        train += spans
        counts[name] = len(spans)
    if not train or not dev:
        raise UsageError("no training or validation texts left; pass more queries, a corpus, or --dev_queries FILE")
    return train, dev, counts


@dataclasses.dataclass(frozen=True)
class TextSettings:
    """What decides the training text, as resolved from distillation.py's flags."""

    train_queries: list[str]
    data_dir: str
    dev_queries: str | None
    num_dev_queries: int
    max_train_queries: int | None
    corpus_text_share: float
    seed: int
    span_words: list[int] | None
    title_share: float
    margin_triples: str | None
    triples_collection: str | None
    score_corpus: str | None


def read_sources(args: TextSettings):
    """(sources record, train texts, dev texts, triples, score corpus): every input file read and checked."""
    specs = [q for q in args.train_queries if not q.startswith("corpus:")]
    files = [msmarco_train_queries(args.data_dir) if q == "msmarco" else Path(q) for q in specs]
    corpora, seen = [], {}
    for spec in (q for q in args.train_queries if q.startswith("corpus:")):
        corpus, file, held_out = corpus_source(spec, args.data_dir)
        if file.resolve() in seen:  # corpus:scifact and corpus:$DATA_DIR/scifact are one source
            raise UsageError(f"{spec} and {seen[file.resolve()]} are the same collection; give it once")
        seen[file.resolve()] = spec
        corpora.append((spec, corpus, held_out, file))
    train, dev, counts = training_texts(
        files,
        [c[:3] for c in corpora],
        args.dev_queries,
        args.num_dev_queries,
        args.max_train_queries,
        args.corpus_text_share,
        args.seed,
        args.span_words,
        args.title_share,
    )
    triples = None
    if args.margin_triples:
        triples = read_triples(
            args.margin_triples, files, args.triples_collection, train, args.max_train_queries, args.seed
        )
    score_corpus = load_corpus(args.score_corpus) if args.score_corpus else None
    sources = source_record(
        files,
        counts,
        [(c[0], c[3]) for c in corpora],
        triples,
        args.triples_collection,
        score_corpus,
        args.score_corpus,
    )
    return sources, train, dev, triples, score_corpus


def _corpus_record(spec: str, file: Path, role: str, texts: int) -> dict:
    return {
        "spec": spec,
        "corpus_file": str(Path(file).resolve()),
        "corpus_sha256": sha256_file(file),
        "role": role,
        "texts": texts,
    }


def source_record(files, counts, corpora, triples, triples_collection, score_corpus, score_spec) -> dict:
    """The training-text record saved as final/training_text.json: exactly the sources that gave the student
    text or documents, by content hash. corpora: (spec, corpus file) of the `corpus:` sources."""
    record = {
        "query_files": [{"path": str(Path(f).resolve()), "sha256": sha256_file(f)} for f in files],
        "queries": counts.get("queries", 0),
        "corpora": [],
    }
    for spec, file in corpora:  # a source that gave no text (a share of 0, empty documents) is not recorded
        if counts[spec]:
            record["corpora"].append(_corpus_record(spec, file, "training text", counts[spec]))
        else:
            logger.warning("%s gave no training text; not recorded", spec)
    if triples:
        record["corpora"].append(
            _corpus_record(triples_collection, triples_collection, "margin triples", len(triples[1]))
        )
    if score_corpus:  # its documents train the student (kl / margin_mse): that collection is not zero-shot
        record["corpora"].append(_corpus_record(score_spec, score_corpus[1], "score corpus", len(score_corpus[0])))
    return record


def inherited_sources(sources: dict, init: str) -> dict:
    """The run's training text plus that of a student it starts from (an earlier run's final/, staged training).

    A collection whose text trained any stage stays in-domain for the final student.
    """
    before = run_files.text_sources(init)
    if before is None:
        return sources
    return {
        **sources,
        "query_files": sources["query_files"]
        + [f for f in before.get("query_files", []) if f not in sources["query_files"]],
        "corpora": sources["corpora"] + before.get("corpora", []),
        "text_hashes": sorted(set(sources.get("text_hashes", [])) | set(before.get("text_hashes", []))),
        "initialised_from": {"model": str(init), **before},
    }
