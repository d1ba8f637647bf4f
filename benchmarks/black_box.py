"""A teacher known only by its vectors: all-mpnet-base-v2 played as a black box (an embedding API, an LLM embedder).

Stage `teacher` plays the provider: it loads mpnet once and hands over only what such a user holds, the query
vectors of a log (MS MARCO train queries; NFCorpus train queries for the in-domain case), the logged vectors of each
evaluation set's queries, and each collection's document index (pyserini folders and .npy files). Stage `students`
then works from those files alone, with no teacher model: it runs distillation.py and evaluate_retrieval.py in
vectors-only mode (mpnet is never loaded) and writes the retention table, zero-shot and in-domain apart.

    python -m benchmarks.black_box teacher --data_dir $DATA_DIR    # mpnet ~51 queries/s, 1-6 docs/s on 2 cores
    python -m benchmarks.black_box train --data_dir $DATA_DIR      # then evaluate, loaded, speed (alone)

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
# small corpora first: mpnet indexes 1-5 documents/s on 2 cores, so SciFact and NFCorpus (5,183 and 3,633 long
# abstracts, 30-60 min each here) are left out of the default: add them with --datasets where the time is there
DATASETS = ["cranfield", "cacm", "npl"]
SYMMETRIC = "cranfield"  # the collection whose documents the symmetric runs train on (in-domain for them)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "stage",
        choices=["teacher", "train", "students", "evaluate", "loaded", "speed"],
        help="teacher: play the provider; train: the students only; students: train and evaluate; loaded: the\n"
        "static student again with the teacher loaded as today (same labels), compared with the vectors-only run;\n"
        "evaluate: the students already trained, as they are;\n"
        "speed: each student exported (serving.py) and timed at batch 1 beside mpnet (run it alone on the machine)",
    )
    p.add_argument("--teacher_model", default=TEACHER)
    p.add_argument("--data_dir", default=cli.DATA_DIR)
    p.add_argument("--datasets", nargs="+", default=DATASETS)
    p.add_argument("--num_train", type=positive_int, default=30_000, help="MS MARCO train queries in the log")
    p.add_argument("--output_path", default="output")
    p.add_argument("--students", nargs="+", default=None, help="only these runs (default: all)")
    p.add_argument("--epochs", type=cli.positive, default=3.0)
    p.add_argument("--truncate_dim", type=positive_int, nargs="+", default=[768, 256, 128])
    return p.parse_args(argv)


def one_line(text: str) -> str:
    return " ".join(text.split()) if "\t" in text or "\n" in text else text


def write_log(folder: Path, name: str, queries: dict[str, str], vectors: np.ndarray) -> None:
    """A user's log: the query file, the provider's vectors and their ids, row for row."""
    folder.mkdir(parents=True, exist_ok=True)
    with run_files.atomic_file(folder / f"{name}.tsv") as tmp:
        # texts as they are (a tab or line break collapsed): the loaded teacher then finds them in its label cache
        tmp.write_text("".join(f"{i}\t{one_line(t)}\n" for i, t in queries.items()))
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


MINILM = "sentence-transformers/all-MiniLM-L6-v2"
NPY_HANDOVER = ("cranfield", "cacm", "npl")  # handed over as .npy + ids; the others as the pyserini folders
# (run name, extra distillation.py flags, training logs): all from the provider's vectors, mpnet never loaded
STUDENTS = [  # cheapest first
    (
        "static",
        ["--student_model_init", "static", "--student_model_init_list", MINILM, "--learning_rate", "1e-2"],
        ["msmarco-train"],
    ),
    (
        "minilm-L2",
        ["--student_model_init", "pretrained", "--student_model_init_list", MINILM, "--layers", "0", "5"],
        ["msmarco-train"],
    ),
    # a symmetric teacher (mpnet: one encoder, no prompts): the index's stored vectors label Cranfield's documents,
    # which makes Cranfield in-domain for these two; does it help?
    (
        "static-cranfield-docs",
        ["--student_model_init", "static", "--student_model_init_list", MINILM, "--learning_rate", "1e-2"]
        + ["--teacher_symmetric"],
        ["msmarco-train"],
    ),
    (
        "minilm-L2-cranfield-docs",
        ["--student_model_init", "pretrained", "--student_model_init_list", MINILM, "--layers", "0", "5"]
        + ["--teacher_symmetric"],
        ["msmarco-train"],
    ),
    # the documents as a larger share of the text (6,000 log queries + 1,398 documents, more epochs)
    (
        "minilm-L2-cranfield-docs-6k",
        ["--student_model_init", "pretrained", "--student_model_init_list", MINILM, "--layers", "0", "5"]
        + ["--teacher_symmetric", "--max_train_queries", "6000", "--num_train_epochs", "6"],
        ["msmarco-train"],
    ),
    (
        "minilm-L6-cranfield-docs-6k",
        ["--student_model_init", "pretrained", "--student_model_init_list", MINILM]
        + ["--teacher_symmetric", "--max_train_queries", "6000", "--num_train_epochs", "4"],
        ["msmarco-train"],
    ),
]


def handover(given: Path, datasets: list[str]) -> dict[str, tuple[str, str]]:
    """{dataset: (its --doc_index, its --doc_ids or - )}: the provider's exported folders, some rewritten as .npy +
    ids (read back from the faiss file, nothing encoded), as a user would hold them."""
    import faiss

    flags = {}
    for name in datasets:
        folder = given / "index" / name
        if name not in NPY_HANDOVER:
            flags[name] = (str(folder), "-")
            continue
        npy, ids = given / "npy" / f"{name}.npy", given / "npy" / f"{name}.ids"
        if not npy.exists():
            index = faiss.read_index(str(folder / "index"))
            npy.parent.mkdir(parents=True, exist_ok=True)
            with run_files.atomic_file(ids) as tmp:
                tmp.write_text((folder / "docid").read_text())
            with run_files.atomic_file(npy) as tmp, open(tmp, "wb") as f:
                np.save(f, index.reconstruct_n(0, index.ntotal))
        flags[name] = (str(npy), str(ids))
    return flags


def joined_log(given: Path) -> tuple[Path, Path]:
    """One log of every logged training query (.npy + ids), as a user's log would hold them together."""
    names = ["msmarco-train", "nfcorpus-train", "nfcorpus-dev"]
    npy, ids = given / "log" / "all.npy", given / "log" / "all.ids"
    if not npy.exists():
        with run_files.atomic_file(ids) as tmp:
            tmp.write_text("".join((given / "log" / f"{n}.ids").read_text() for n in names))
        with run_files.atomic_file(npy) as tmp, open(tmp, "wb") as f:
            np.save(f, np.concatenate([np.load(given / "log" / f"{n}.npy") for n in names]))
    return npy, ids


def train_students(args, given: Path, out: Path, only: list[str] | None) -> dict[str, str]:
    """{run: final/ folder}: each student trained by distillation.py from the log alone (finished runs kept)."""
    import distillation

    npy, ids = joined_log(given)
    finals = {}
    for name, flags, logs in STUDENTS:
        if only and name not in only:
            continue
        argv = ["--train_queries", *[str(given / "log" / f"{n}.tsv") for n in logs]]
        argv += ["--teacher_query_embeddings", str(npy), "--teacher_query_ids", str(ids)]
        argv += ["--dev_queries", str(given / "log" / "nfcorpus-dev.tsv")] if "nfcorpus-train" in logs else []
        if "--teacher_symmetric" in flags:
            argv += ["--doc_index", str(given / "index" / SYMMETRIC), "--score_corpus", f"{args.data_dir}/{SYMMETRIC}"]
        argv += ["--num_train_epochs", str(args.epochs), "--output_path", str(out), "--run_name", name]
        argv += ["--skip_finished", "--log_level", "info", *flags]  # a run's own flags last: they override
        logger.info("distillation.py %s", " ".join(argv))
        run = distillation.main(argv)["runs"][0]
        finals[name] = run["final_path"]
    return finals


FLOOR_TEXTS = 6000  # the floor: MiniLM frozen, a least-squares map fitted on 6,000 MS MARCO train queries


def floor_student(given: Path, out: Path) -> str:
    """all-MiniLM-L6-v2 left frozen with only a least-squares linear map to the teacher's space (the floor the
    trained students must beat), saved as a model folder; nothing is trained."""
    from qdistill import query_log, students, vector_teacher

    final = out / "floor-lstsq" / "final"
    if (final / "config.json").is_file():
        return str(final)
    log = query_log.QueryLog(
        given / "log" / "msmarco-train.npy", given / "log" / "msmarco-train.ids", [given / "log" / "msmarco-train.tsv"]
    )
    texts = list(data.read_queries(given / "log" / "msmarco-train.tsv").values())[:FLOOR_TEXTS]
    labels, missing = log.lookup(texts)
    assert not missing
    teacher = vector_teacher.VectorTeacher("mpnet-as-vectors", log.rows.dim, "cosine")
    student, _ = encoders.load_model(MINILM, "cpu")
    student = students.project(student, teacher, log.rows.dim, "cpu", MINILM)
    fit = students.fit_projection(student, texts, labels)
    logger.info("floor: all-MiniLM-L6-v2 frozen + least-squares map on %d queries, fit cosine %.4f", len(texts), fit)
    with run_files.atomic_dir(final) as tmp:
        student.save(str(tmp))
    return str(final)


def evaluate_students(args, given: Path, out: Path, finals: dict[str, str], dims: list[int]) -> dict:
    """evaluate_retrieval.py with the teacher as its logged vectors and each collection's handed-over index."""
    import evaluate_retrieval

    index = handover(given, args.datasets)
    argv = ["--models", *finals.values(), "--datasets", *[str(Path(args.data_dir) / d) for d in args.datasets]]
    argv += ["--doc_index", *[index[d][0] for d in args.datasets], "--doc_ids", *[index[d][1] for d in args.datasets]]
    argv += ["--teacher_query_embeddings", *[str(given / "eval" / f"{d}.npy") for d in args.datasets]]
    argv += ["--teacher_query_ids", *[str(given / "eval" / f"{d}.ids") for d in args.datasets]]
    argv += ["--teacher_name", "mpnet-as-vectors", "--output_path", str(out), "--log_level", "info"]
    argv += ["--truncate_dim", *map(str, dims)] if dims else []
    logger.info("evaluate_retrieval.py %s", " ".join(argv))
    return evaluate_retrieval.main(argv)


def loaded_run(args, given: Path, out: Path) -> dict:
    """The `static` student trained and evaluated with the teacher loaded (labels from the label cache the
    provider filled, the same vectors), beside its vectors-only run: the numbers must agree."""
    import distillation
    import evaluate_retrieval

    name, flags, logs = next(s for s in STUDENTS if s[0] == "static")
    argv = ["--teacher_model", args.teacher_model, "--train_queries", *[str(given / "log" / f"{n}.tsv") for n in logs]]
    argv += [*flags, "--num_train_epochs", str(args.epochs), "--output_path", str(out / "loaded"), "--run_name", name]
    argv += ["--data_dir", args.data_dir, "--skip_finished", "--log_level", "info"]
    final = distillation.main(argv)["runs"][0]["final_path"]
    datasets = [str(Path(args.data_dir) / d) for d in args.datasets]
    loaded = evaluate_retrieval.main(
        ["--teacher_model", args.teacher_model, "--models", final, "--datasets", *datasets]
        + ["--output_path", args.output_path, "--data_dir", args.data_dir, "--log_level", "info"]
    )
    vectors = evaluate_students(args, given, out, {name: str(out / name / "final")}, [])
    pick = {("loaded", r["model"] == args.teacher_model, r["dataset"]): r for r in loaded["rows"]}
    pick.update({("vectors", r["model"] == "mpnet-as-vectors", r["dataset"]): r for r in vectors["rows"]})
    names = [Path(d).name for d in datasets]
    compare = {
        d: {
            who: {side: pick[(side, who == "teacher", d)]["metrics"]["NDCG@10"] for side in ("loaded", "vectors")}
            for who in ("teacher", "student")
        }
        for d in names
    }
    run_files.write_json(out / "loaded-vs-vectors.json", compare)
    logger.info("nDCG@10 loaded vs vectors only: %s", json.dumps(compare, indent=1))
    return compare


SPEED_RUNS = ["floor-lstsq", "minilm-L2", "static"]  # floor-lstsq: all six MiniLM layers + the projection


def speed(args, out: Path) -> dict:
    """Batch-1 latency of mpnet (torch, as run today) and of each student (torch, and its export: ONNX Runtime fp32
    for transformers, the numpy table for the static one), side by side in one evaluate_speed.py run."""
    import evaluate_speed
    import serving

    queries = str(Path(args.data_dir) / "scifact")
    models = [args.teacher_model]
    for name in SPEED_RUNS:
        final = next((out / name).glob("**/final"))  # pretrained runs: <run>/<student>/final
        argv = [
            "--model",
            str(final),
            "--queries",
            queries,
            "--output_path",
            str(final.parent / "export"),
            "--no_int8",
        ]
        models += [str(final), *[str(final.parent / "export" / v) for v in serving.main(argv)]]
    return evaluate_speed.main(
        ["--models", *models, "--queries", queries, "--batch_sizes", "1", "--num_threads", "2"]
        + ["--data_dir", args.data_dir, "--output_path", args.output_path, "--run_name", "black-box"]
    )


def main(argv=None):
    args = parse_args(argv)
    cli.setup_logging("info")
    if args.stage == "teacher":
        play_teacher(args)
        return
    given, out = Path(args.output_path) / "bench-blackbox" / "given", Path(args.output_path) / "bench-blackbox"
    ready = (given / "done.json").is_file() or (args.stage == "train" and (given / "log" / "all.ids").parent.is_dir())
    if not ready:
        raise cli.UsageError(f"{given} is not complete; run `python -m benchmarks.black_box teacher` first")
    if args.stage == "loaded":
        loaded_run(args, given, out)
        return
    if args.stage == "speed":
        speed(args, out)
        return
    if args.stage == "evaluate":
        finals = {name: str(next((out / name).glob("**/final"))) for name, _, _ in STUDENTS if (out / name).is_dir()}
    else:
        finals = train_students(args, given, out, args.students)
    if args.stage in ("students", "evaluate"):
        finals = {"floor-lstsq": floor_student(given, out), **finals}
        evaluate_students(args, given, out, finals, args.truncate_dim)


if __name__ == "__main__":
    cli.cli(main)
