"""A student evaluated against an MS MARCO-sized teacher index (8.8M x 384) on this machine: 1,000 queries by exact
search over the .npy (chunked) and through an HNSW index built once, each run's wall time and peak memory, beside
the time the teacher would need to re-encode that corpus here (measured on a sample in the same run).

The index is the teacher's real document vectors of the offline collections (their cached teacher indexes; built
on first use), then synthetic distractor vectors up to --num_docs: drawn from a Gaussian with the real vectors' mean
and covariance and unit-normalised, as a cosine teacher's are. They are not documents and no qrels name them:
nDCG@10 is measured on the real part's qrels, with the distractors competing for every rank.

    python -m benchmarks.large_index --teacher_model sentence-transformers/all-MiniLM-L6-v2 \\
        --model output/example-minilm-L2/final --datasets scifact nfcorpus cranfield cacm
    python -m benchmarks.large_index ... --modes hnsw   # after the HNSW file is built (--modes build_hnsw)

Outputs: output/bench-index/{collection-<num_docs>-<key>/, eval-<mode>/, results.json}: the collection folder is
keyed by everything it is made of (the teacher's content, each real collection's content, --num_docs,
--num_queries, --seed), the HNSW file by its build settings, so other inputs never reuse another's files.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from qdistill import cli, data, encoders, given_index, run_files, teacher_outputs
from qdistill.cli import positive_int

logger = logging.getLogger("qdistill.bench_index")
# runs a script and writes its peak resident memory (VmHWM: this process since exec) to $PEAK_FILE. The rusage of a
# child (os.wait4) would not do: its maxrss keeps the parent's resident set at the fork, and the parent here
# has written the whole 13.5 GB index through a memory map
PEAK_WRAPPER = """
import os, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    open(os.environ["PEAK_FILE"], "w").write(hwm.split()[1])
"""
MSMARCO_PASSAGES = 8_841_823
# MS MARCO passages average about 56 words: the re-encoding estimate encodes texts of that length (a window of each
# sampled real document), as the index of such a corpus is built
PASSAGE_WORDS = 56
HNSW_TRAIN = 200_000  # vectors the scalar quantiser is trained on (all of them below that)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("--teacher_model", default="sentence-transformers/all-MiniLM-L6-v2")
    add("--model", required=True, help="the student evaluated")
    add("--datasets", nargs="+", default=["scifact", "nfcorpus", "cranfield", "cacm"], help="the real part")
    add("--data_dir", default=cli.DATA_DIR)
    add("--num_docs", type=positive_int, default=MSMARCO_PASSAGES)
    add("--num_queries", type=positive_int, default=1000)
    add("--modes", nargs="+", default=["exact"], choices=["exact", "build_hnsw", "hnsw"])
    add("--hnsw_m", type=positive_int, default=16)
    add("--hnsw_ef_construction", type=positive_int, default=40)
    add("--hnsw_ef_search", type=positive_int, default=128)
    add("--output_path", default="output/bench-index")
    add("--index_cache", default="output", help="where the real collections' teacher indexes are cached")
    add("--seed", type=int, default=0)
    add("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def real_part(args, teacher, teacher_path):
    """(vectors, prefixed ids, corpus records, queries, qrels) of the real collections, from their teacher indexes."""
    vectors, ids, corpus, queries, qrels, spare = [], [], {}, {}, {}, {}
    for name, folder, _ in data.expand_datasets(args.datasets, args.data_dir):
        docs, qs, rel, _ = data.load_beir(folder, "test")
        emb, doc_ids, _ = teacher_outputs.teacher_index(
            teacher, args.teacher_model, teacher_path, docs, folder / "corpus.jsonl", args.index_cache
        )
        vectors.append(np.asarray(emb, np.float32))
        ids += [f"{name}/{d}" for d in doc_ids]
        corpus.update({f"{name}/{d}": docs[d] for d in doc_ids})
        queries.update({f"{name}/{q}": t for q, t in qs.items()})
        qrels.update({f"{name}/{q}": {f"{name}/{d}": s for d, s in r.items()} for q, r in rel.items()})
        if (folder / "qrels" / "train.tsv").is_file():  # judged train queries fill up to --num_queries
            _, tq, trel, _ = data.load_beir(folder, "train")
            spare.update(
                {f"{name}/train-{q}": (t, {f"{name}/{d}": s for d, s in trel[q].items()}) for q, t in tq.items()}
            )
    for q in sorted(spare)[: max(0, args.num_queries - len(queries))]:
        queries[q], qrels[q] = spare[q]
    keep = sorted(queries)[: args.num_queries]
    return np.concatenate(vectors), ids, corpus, {q: queries[q] for q in keep}, {q: qrels[q] for q in keep}


def assemble(args, folder: Path) -> dict:
    """folder/{embeddings.npy, docid, corpus.jsonl, queries.jsonl, qrels/test.tsv}, written once."""
    if (folder / "meta.json").is_file():
        return json.loads((folder / "meta.json").read_text())
    teacher, teacher_path = encoders.load_model(args.teacher_model, "cpu", args.data_dir)
    real, ids, corpus, queries, qrels = real_part(args, teacher, teacher_path)
    if args.num_docs < len(real):
        raise cli.UsageError(f"--num_docs {args.num_docs} is below the {len(real)} real documents")
    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    mean, cov = real.mean(0), np.cov(real, rowvar=False)
    chol = np.linalg.cholesky(cov + 1e-6 * np.eye(len(cov)))
    with run_files.atomic_dir(folder) as tmp:
        out = np.lib.format.open_memmap(tmp / "embeddings.npy", "w+", np.float32, (args.num_docs, real.shape[1]))
        out[: len(real)] = real
        from tqdm.auto import tqdm

        for start in tqdm(range(len(real), args.num_docs, 262_144), desc="distractors", unit="chunk"):
            n = min(262_144, args.num_docs - start)
            block = rng.standard_normal((n, real.shape[1]), np.float32) @ chol.T.astype(np.float32) + mean
            out[start : start + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
        out.flush()
        del out
        with open(tmp / "docid", "w", encoding="utf-8") as f:
            f.writelines(f"{d}\n" for d in ids)
            f.writelines(f"distractor-{i}\n" for i in range(args.num_docs - len(ids)))
        with open(tmp / "corpus.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"_id": d, **corpus[d]}) + "\n" for d in ids)
        with open(tmp / "queries.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items())
        (tmp / "qrels").mkdir()
        rows = [f"{q}\t{d}\t{s}" for q, r in qrels.items() for d, s in r.items()]
        (tmp / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
        meta = {
            "num_docs": args.num_docs,
            "real_docs": len(real),
            "distractors": args.num_docs - len(real),
            "queries": len(queries),
            "dim": int(real.shape[1]),
            "datasets": args.datasets,
            "assemble_seconds": round(time.perf_counter() - t0, 1),
        }
        run_files.write_json(tmp / "meta.json", meta)
    return meta


def build_hnsw(args, folder: Path) -> dict:
    """An HNSW graph over 8-bit scalar-quantised vectors (a 384-d float index would need ~14 GB of RAM), built once
    from the .npy in chunks, as a search team would have it; searched as built by evaluate_retrieval.py."""
    import faiss

    name = f"hnsw-sq8-m{args.hnsw_m}-efc{args.hnsw_ef_construction}-efs{args.hnsw_ef_search}-seed{args.seed}"
    index_file, meta_file = folder / f"{name}.faiss", folder / f"{name}.json"
    if index_file.is_file() and meta_file.is_file():
        return json.loads(meta_file.read_text())
    vectors = given_index.open_npy(folder / "embeddings.npy", given_index.read_ids(folder / "docid"))
    t0 = time.perf_counter()
    index = faiss.IndexHNSWSQ(vectors.dim, faiss.ScalarQuantizer.QT_8bit, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = args.hnsw_ef_construction
    take = min(HNSW_TRAIN, len(vectors))
    sample = np.sort(np.random.default_rng(args.seed).choice(len(vectors), take, replace=False))
    index.train(vectors.vectors(sample))
    from tqdm.auto import tqdm

    for _, block in tqdm(
        vectors.chunks(), total=-(-len(vectors) // given_index.CHUNK_ROWS), desc="hnsw", unit="chunk"
    ):
        index.add(block)
    index.hnsw.efSearch = args.hnsw_ef_search  # saved in the file: searched as built
    with run_files.atomic_file(index_file) as tmp:
        faiss.write_index(index, str(tmp))
    meta = {"m": args.hnsw_m, "ef_construction": args.hnsw_ef_construction, "ef_search": args.hnsw_ef_search}
    meta.update(build_seconds=round(time.perf_counter() - t0, 1), file_bytes=index_file.stat().st_size)
    run_files.write_json(meta_file, meta)
    return meta


def evaluate(args, folder: Path, mode: str) -> dict:
    """evaluate_retrieval.py in a child process against the given index: wall time, peak RSS, its results."""
    hnsw = f"hnsw-sq8-m{args.hnsw_m}-efc{args.hnsw_ef_construction}-efs{args.hnsw_ef_search}-seed{args.seed}.faiss"
    if mode == "hnsw" and not (folder / hnsw).is_file():
        raise cli.UsageError(f"--modes hnsw: no HNSW file with these settings in {folder}; add --modes build_hnsw")
    index = ["--doc_index", str(folder / ("embeddings.npy" if mode == "exact" else hnsw))]
    out = Path(args.output_path) / f"eval-{mode}"
    script = ["evaluate_retrieval.py", "--teacher_model", args.teacher_model, "--models", args.model]
    cmd = [sys.executable, "-c", PEAK_WRAPPER, *script]
    cmd += ["--datasets", str(folder), *index, "--doc_ids", str(folder / "docid"), "--output_path", str(out)]
    cmd += ["--overwrite", "--log_level", "warning", "--data_dir", args.data_dir]
    peak_file = out / "peak_rss_kb"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    env = {**os.environ, "PEAK_FILE": str(peak_file)}
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(script)} failed")
    results = {}
    for f in out.glob("retrieval/*/*/*.json"):
        r = json.loads(f.read_text())
        results[r["model"]] = {
            "NDCG@10": r["metrics"]["NDCG@10"],
            "Recall@100": r["metrics"]["Recall@100"],
            "search_seconds": r["timings"]["search_seconds"],
            "query_encode_seconds": r["timings"]["query_encode_seconds"],
            "doc_index": r["doc_index"],
        }
    peak = int(peak_file.read_text()) / 2**20
    return {"wall_seconds": round(wall, 1), "peak_rss_gib": round(peak, 2), "results": results}


def reencode_rate(args, folder: Path, n: int = 2048) -> float:
    """The teacher's passages per second here, encoded as an index is built: passage-length texts (a
    PASSAGE_WORDS-word window of each sampled real document), in length-sorted batches of 32 (encode_document
    sorts each call by length), after one warm-up batch."""
    teacher, _ = encoders.load_model(args.teacher_model, "cpu", args.data_dir)
    docs = [json.loads(line) for line in (folder / "corpus.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(args.seed)
    texts = []
    for i in rng.choice(len(docs), min(n, len(docs)), replace=False):
        words = teacher_outputs.doc_text(docs[i]).split()
        start = int(rng.integers(0, max(1, len(words) - PASSAGE_WORDS)))
        texts.append(" ".join(words[start : start + PASSAGE_WORDS]))
    teacher.encode_document(texts[:32], batch_size=32)
    t0 = time.perf_counter()
    teacher.encode_document(texts, batch_size=32)
    return len(texts) / (time.perf_counter() - t0)


def collection_folder(args) -> Path:
    """output/bench-index/collection-<num_docs>-<key>: keyed by the teacher's and each collection's content and
    every setting the collection is assembled with."""
    teacher_path = encoders.resolve_model_path(args.teacher_model, args.data_dir)
    parts = {
        "teacher": teacher_outputs.model_fingerprint(teacher_path),
        "datasets": [
            [name, given_index.file_sha256(folder / "corpus.jsonl"), given_index.file_sha256(folder / "queries.jsonl")]
            for name, folder, _ in data.expand_datasets(args.datasets, args.data_dir)
        ],
        "num_docs": args.num_docs,
        "num_queries": args.num_queries,
        "seed": args.seed,
    }
    key = teacher_outputs.sha256_texts([json.dumps(parts, sort_keys=True)])[:12]
    return Path(args.output_path) / f"collection-{args.num_docs}-{key}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    cli.start_run(args.log_level, args.seed, args.output_path)
    folder = collection_folder(args)
    report = {"config": run_files.run_info(vars(args), "cpu", argv, __file__), "collection": assemble(args, folder)}
    results_file = Path(args.output_path) / "results.json"
    previous = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for mode in args.modes:
        report[mode] = build_hnsw(args, folder) if mode == "build_hnsw" else evaluate(args, folder, mode)
        print(mode, json.dumps(report[mode]), flush=True)
    rate = reencode_rate(args, folder)
    report["teacher_reencode"] = {"docs_per_second": round(rate, 2), "hours": round(args.num_docs / rate / 3600, 1)}
    run_files.write_json(results_file, {**previous, **report})
    print(table({**previous, **report}))
    return report


def table(report: dict) -> str:
    hours = report["teacher_reencode"]["hours"]
    lines = ["| run | wall time | peak RSS | teacher nDCG@10 | student nDCG@10 |", "|---|---|---|---|---|"]
    for mode in ("exact", "hnsw"):
        if mode in report:
            r = report[mode]
            teacher = r["results"].get(report["config"]["args"]["teacher_model"], {}).get("NDCG@10")
            student = next(
                (v["NDCG@10"] for k, v in r["results"].items() if k != report["config"]["args"]["teacher_model"]), None
            )
            lines.append(
                f"| {mode} | {r['wall_seconds']:.0f} s | {r['peak_rss_gib']:.2f} GiB | {teacher:.4f} | {student:.4f} |"
            )
    lines.append(f"| teacher re-encoding the corpus here | {hours:.1f} h (estimated) | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    cli.cli(main)
