"""A teacher known only by its vectors: all-mpnet-base-v2 played as a black box (an embedding API, an LLM embedder).

Stage `teacher` plays the provider: it loads mpnet once and hands over only what such a user holds, the query
vectors of a log (MS MARCO train queries; NFCorpus train queries for the in-domain case), the logged vectors of each
evaluation set's queries, and each collection's document index (pyserini folders and .npy files). Stage `students`
then works from those files alone, with no teacher model: it runs distillation.py and evaluate_retrieval.py in
vectors-only mode (mpnet is never loaded) and writes the retention table, zero-shot and in-domain apart.

    python -m benchmarks.black_box teacher --data_dir ../shared/data   # mpnet ~51 queries/s, 2.5-5 docs/s here
    python -m benchmarks.black_box students --data_dir ../shared/data

Outputs: output/bench-blackbox/given/ (what the provider hands over: log/, eval/, index/), and the runs and results
of the students under output/bench-blackbox/.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from qdistill import cli, data, encoders, run_files, teacher_outputs
from qdistill.cli import positive_int

logger = logging.getLogger("qdistill.bench_blackbox")
TEACHER = "sentence-transformers/all-mpnet-base-v2"
DATASETS = ["cranfield", "cacm", "npl", "nfcorpus", "scifact"]  # small corpora first: the index stage is long


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("stage", choices=["teacher", "students"])
    p.add_argument("--teacher_model", default=TEACHER)
    p.add_argument("--data_dir", default=cli.DATA_DIR)
    p.add_argument("--datasets", nargs="+", default=DATASETS)
    p.add_argument("--num_train", type=positive_int, default=30_000, help="MS MARCO train queries in the log")
    p.add_argument("--output_path", default="output")
    return p.parse_args(argv)


def write_log(folder: Path, name: str, queries: dict[str, str], vectors: np.ndarray) -> None:
    """A user's log: the query file, the provider's vectors and their ids, row for row."""
    folder.mkdir(parents=True, exist_ok=True)
    with run_files.atomic_file(folder / f"{name}.tsv") as tmp:
        tmp.write_text("".join(f"{i}\t{' '.join(t.split())}\n" for i, t in queries.items()))
    with run_files.atomic_file(folder / f"{name}.ids") as tmp:
        tmp.write_text("".join(f"{i}\n" for i in queries))
    with run_files.atomic_file(folder / f"{name}.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(vectors, np.float32))


def split_queries(folder: Path, split: str) -> dict[str, str]:
    queries = data.read_queries(folder / "queries.jsonl")
    wanted = {line.split("\t")[0] for line in (folder / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]}
    return {i: t for i, t in queries.items() if i in wanted}


def play_teacher(args) -> None:
    """The provider's side: every vector a vectors-only user would hold, made by the loaded teacher."""
    import evaluate_retrieval

    out = Path(args.output_path) / "bench-blackbox" / "given"
    path = encoders.resolve_model_path(args.teacher_model, args.data_dir)
    teacher, _ = encoders.load_model(args.teacher_model, "cpu", path=path)

    def label(texts):  # as distillation.py labels (max length 128, the label cache): a loaded run gets the same
        return teacher_outputs.teacher_labels(teacher, path, texts, args.output_path, 128)[0]

    data_dir = Path(args.data_dir)
    logs = {
        "msmarco-train": dict(list(data.read_queries(data_dir / "queries" / "msmarco-train-sample.tsv").items())),
        "nfcorpus-train": split_queries(data_dir / "nfcorpus", "train"),
        "nfcorpus-dev": split_queries(data_dir / "nfcorpus", "dev"),
    }
    logs["msmarco-train"] = dict(list(logs["msmarco-train"].items())[: args.num_train])
    for name, queries in logs.items():
        if not (out / "log" / f"{name}.npy").exists():
            write_log(out / "log", name, queries, label(list(queries.values())))
    for name in args.datasets:  # each evaluation set's queries, encoded as evaluate_retrieval.py encodes them
        if not (out / "eval" / f"{name}.npy").exists():
            queries = split_queries(data_dir / name, "test")
            emb = teacher.encode_query(list(queries.values()), batch_size=128, convert_to_numpy=True)
            write_log(out / "eval", name, queries, emb)
    # the document indexes (cached under output/index/) and mpnet's own results when loaded, as the reference
    evaluate_retrieval.main(
        ["--teacher_model", args.teacher_model, "--datasets", *[str(data_dir / d) for d in args.datasets]]
        + ["--export_index", str(out / "index"), "--output_path", args.output_path, "--data_dir", args.data_dir]
    )
    (out / "done.json").write_text(json.dumps({"teacher": args.teacher_model, "datasets": args.datasets}))


def main(argv=None):
    args = parse_args(argv)
    cli.setup_logging("info")
    if args.stage == "teacher":
        play_teacher(args)


if __name__ == "__main__":
    cli.cli(main)
