"""Score student query encoders against the teacher's own cached document index: with relevance labels (BEIR
qrels: nDCG@10 retention with 95% intervals) and without them (agreement with the teacher's own ranking).

The teacher is always evaluated too (its query encoder against its index), so each student gets a
retention = student nDCG@10 / teacher nDCG@10 per dataset and the mean of those ratios, each with a paired
bootstrap interval and a paired t-test (stats.py), and its agreement with the teacher on the same queries:
overlap@10, the share of teacher top-1s in the student's top-10, and the cosine to the teacher's query embedding.

    python evaluate_retrieval.py --teacher_model sentence-transformers/all-MiniLM-L6-v2 \\
        --models output/all-MiniLM-L6-v2-L0-5/final --datasets scifact nfcorpus fiqa
    python evaluate_retrieval.py --teacher_model T --models S \\
        --datasets $DATA_DIR/scifact $DATA_DIR/cranfield --index hnsw
    # your collection, no relevance labels: a query log, or pseudo-queries sampled from the documents
    python evaluate_retrieval.py --teacher_model T --models S --datasets my_docs.tsv --queries my_log.tsv
    python evaluate_retrieval.py --teacher_model T --models S --datasets $DATA_DIR/nfcorpus --label_free \\
        --pseudo_queries 500
    # the teacher index you already have, as it is (nothing re-encoded; 64 documents re-encoded to check it)
    python evaluate_retrieval.py --teacher_model T --models S --datasets my_beir_folder --doc_index my_pyserini_index
    python evaluate_retrieval.py --teacher_model T --models S --datasets my_beir_folder \\
        --doc_index embeddings.npy --doc_ids docids.txt

Outputs: output/index/<teacher>/<dataset>/ (cached teacher embeddings), one JSON per (model, dataset) in
output/retrieval/<teacher>/<model>/<dataset>.json (<dataset>.hnsw.json for --index hnsw; with per-query values
and what made the result), and the tables (labelled; label-free) in output/retrieval/<teacher>/results.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from qdistill import cli, eval_data, evaluation, run_files, tables
from qdistill.cli import positive_int
from qdistill.eval_data import EvalSettings

logger = logging.getLogger("qdistill.retrieval")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add(
        "--teacher_model",
        default=None,
        help=f"HF id or folder; its document index is searched (default: {cli.PAPER_TEACHER}, unless the teacher\n"
        "is given as vectors: --teacher_query_embeddings)",
    )
    add(
        "--teacher_query_embeddings",
        nargs="+",
        default=None,
        help="a teacher known only by its vectors (an embedding API, an LLM embedder): per dataset, the .npy of its\n"
        "logged query vectors; with --teacher_query_ids and --doc_index per dataset, and no --teacher_model",
    )
    add("--teacher_query_ids", nargs="+", default=None, help="per dataset, the ids of those rows (one a line)")
    add(
        "--teacher_similarity",
        choices=["cosine", "dot"],
        default=None,
        help="a vectors-only teacher's score function (default: cosine when every logged vector is unit length)",
    )
    add("--teacher_name", default="teacher-vectors", help="a vectors-only teacher's name in tables and folders")
    add(
        "--truncate_dim",
        type=positive_int,
        nargs="+",
        default=None,
        help="Matryoshka: evaluate at these dimensions (the first d of every vector, renormalised for cosine),\n"
        "the teacher at the same d; one table each",
    )
    add("--models", nargs="*", default=[], help="student models (HF ids or folders such as output/RUN/final)")
    add("--datasets", nargs="+", required=True, help="BEIR names or folders; without qrels also a collection tsv")
    add("--data_dir", default=cli.DATA_DIR, help="where BEIR names are looked for / downloaded to")
    add("--split", default=None, help="qrels split (default: test; dev for msmarco)")
    add("--label_free", action="store_true", help="ignore qrels: agreement with the teacher only")
    add("--queries", default=None, help="queries of label-free datasets: a file or log (id<TAB>text or one a line)")
    add(
        "--pseudo_queries",
        type=positive_int,
        default=None,
        help="label-free datasets without queries: N pseudo-queries sampled from the documents",
    )
    add("--k_values", type=positive_int, nargs="+", default=[1, 3, 5, 10, 100], help="must include 10")
    add("--corpus_max_seq_length", type=positive_int, default=None, help="default: the teacher's max_seq_length")
    add("--corpus_batch_size", type=positive_int, default=32)
    add("--query_batch_size", type=positive_int, default=128)
    add("--encode_devices", nargs="+", default=None, help="several devices: multi-process corpus encoding")
    add("--index", default="flat", choices=["flat", "hnsw", "ivfpq"], help="flat = exact inner product")
    add(
        "--doc_index",
        nargs="+",
        default=None,
        help="the teacher's document index you have, one per dataset: a pyserini folder (index + docid), or a\n"
        "faiss file or embeddings .npy with --doc_ids; no document is encoded beyond a 64-document check",
    )
    add("--doc_ids", nargs="+", default=None, help="each --doc_index file's ids (one a line; - for a pyserini folder)")
    add(
        "--allow_partial_index",
        action="store_true",
        help="accept a --doc_index that lacks more than 1%% of the corpus's documents (the table shows the share)",
    )
    add(
        "--milvus_search_params",
        default=None,
        help="a milvus: --doc_index searched with these, e.g. '{\"nprobe\": 16}' (default: the engine's own)",
    )
    add("--export_index", default=None, help="also write each teacher index built here as DIR/<dataset>/{index,docid}")
    add("--output_path", default="output")
    add("--save_run", action="store_true", help="also write a TREC run file per (model, dataset)")
    add(
        "--overwrite_output_dir",
        "--overwrite",
        dest="overwrite",
        action="store_true",
        help="re-evaluate finished (model, dataset) pairs",
    )
    add(
        "--self_retrieval",
        action="store_true",
        help="the datasets' queries are documents (as in ArguAna, Quora): drop each query's own id from its\n"
        "results (elsewhere only where the document of that id has the query's text)",
    )
    add("--device", default="auto")
    add("--seed", type=cli.non_negative_int, default=0, help="bootstrap intervals and pseudo-query sampling")
    add("--index_seed", type=cli.non_negative_int, default=42, help="hnsw/ivfpq index builds")
    add("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    _validate(p, args)
    args.k_values = sorted(set(args.k_values))
    return args


def _validate(p, args) -> None:
    """Flag combinations that cannot work: argparse's exit 2 with one line, before anything runs."""
    if 10 not in args.k_values:
        p.error("--k_values must include 10: nDCG@10 is the reported metric and the base of retention")
    if args.queries and args.pseudo_queries:
        p.error("--queries and --pseudo_queries are two query sources; give one")
    if args.doc_ids and not args.doc_index:
        p.error("--doc_ids goes with --doc_index (the index whose rows they name)")
    if args.doc_ids and len(args.doc_ids) != len(args.doc_index):
        p.error(f"--doc_ids lists {len(args.doc_ids)} files, --doc_index {len(args.doc_index)}; one each (- for none)")
    if args.export_index and args.doc_index:
        p.error("--export_index writes indexes this script builds; with --doc_index it builds none")
    if args.export_index and Path(args.export_index).exists() and not Path(args.export_index).is_dir():
        p.error(f"--export_index {args.export_index} is a file; give a folder (each dataset goes in DIR/<dataset>)")
    args.vectors_only = bool(args.teacher_query_embeddings)
    if args.vectors_only:
        if args.teacher_model:
            p.error(
                "--teacher_query_embeddings stand in for the teacher; drop --teacher_model (a loaded teacher encodes "
                "the queries itself)"
            )
        if not args.teacher_query_ids or not args.doc_index:
            p.error("a teacher known by its vectors needs --teacher_query_ids and --doc_index, one per dataset")
        if args.pseudo_queries:
            p.error("--pseudo_queries have no logged teacher vectors; give a logged --queries file")
        if args.export_index:
            p.error("--export_index writes indexes the teacher builds; a teacher known by its vectors builds none")
        args.teacher_model = args.teacher_name
    else:
        for flag in ("teacher_query_ids", "teacher_similarity"):
            if getattr(args, flag):
                p.error(f"--{flag} goes with --teacher_query_embeddings (a teacher known by its vectors)")
        args.teacher_model = args.teacher_model or cli.PAPER_TEACHER


def main(argv=None) -> dict:
    """The pipeline: datasets checked, models resolved and loaded (given indexes checked against the teacher),
    each dataset evaluated (results reused when made alike), the tables written."""
    args = parse_args(argv)
    cli.start_run(args.log_level, args.seed, args.output_path)
    device = cli.pick_device(args.device)
    dims = sorted(set(args.truncate_dim or [None]), key=lambda d: -(d or 1 << 30))  # full first, then smaller
    cfg = dataclasses.replace(cli.settings_from(EvalSettings, args), truncate_dim=dims[0])
    config = run_files.run_info(vars(args), device, argv, __file__)
    datasets = eval_data.check_datasets(cfg)  # first: a bad dataset is named before any model is looked up
    datasets = eval_data.teacher_logs(cfg, datasets)  # the largest d is checked: the smaller ones fit too
    paths = evaluation.model_paths(cfg)
    sources = {name: path and run_files.text_sources(path) for name, path in paths.items()}
    models, datasets = evaluation.load_models(cfg, paths, device, datasets)
    rows, parts = [], []
    for d in dims:  # Matryoshka: one pass and one table per dimension, the teacher at the same d
        at = dataclasses.replace(cfg, truncate_dim=d)
        found = [
            row
            for ds, queries in datasets
            for row in evaluation.evaluate_dataset(at, ds, queries, paths, models, sources, config)
        ]
        found, table = tables.evaluation_tables(found, cfg.teacher_model, cfg.seed)
        rows += found
        parts.append(f"## d = {d}\n\n{table}" if args.truncate_dim else table)
    table = "\n".join(parts)
    run_files.write_text(evaluation.results_root(cfg) / "results.md", table)
    print(table)
    return {"rows": rows, "table": table}


if __name__ == "__main__":
    cli.cli(main)
