"""Shared test helpers: tiny BEIR folders, query files, argv builders, evaluation and distillation runners."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import MINILM, TRAIN_TSV, make_tiny
from sentence_transformers import SentenceTransformer

import distillation
import evaluate_retrieval as er
from qdistill import (
    cli,
)

QUERIES = {"q1": "purring small mammal", "q2": "rocket engine thrust"}


QRELS = {"q1": {"d1": 1}, "q2": {"d2": 1}}


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def exit_2(main, argv, capsys, match):
    """main(argv) exits 2 with one `error:` line containing match."""
    with pytest.raises(SystemExit) as e:
        cli.cli(main, argv)
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and match in err[0], err


def queries_file(tmp_path, n=80):
    return write(tmp_path / "q.tsv", "".join(f"{i}\tquery number {i} about topic {i % 7}\n" for i in range(n)))


def distill_argv(teacher, out, queries, *extra):
    return [
        "--teacher_model",
        teacher,
        "--num_layers",
        "2",
        "--train_queries",
        queries,
        "--output_path",
        str(out),
        "--num_dev_queries",
        "5",
        "--eval_steps",
        "2",
        "--per_device_train_batch_size",
        "16",
        "--num_train_epochs",
        "1",
        "--log_level",
        "error",
        *extra,
    ]


DOCS = {
    "d1": ("Cats", "The domestic cat is a small carnivorous mammal that purrs."),
    "d2": ("Rockets", "A rocket engine uses stored propellant to produce thrust in space."),
    "d3": ("Bread", "Sourdough bread is leavened by wild yeast and lactic acid bacteria."),
    "d4": ("Volcanoes", "A volcano is a rupture in the crust through which lava erupts."),
}

MORE_DOCS = {**DOCS, **{f"x{i}": ("", f"filler text number {i} on topic {i % 5}") for i in range(40)}}


def run_evaluation(teacher, models, datasets, out, *extra) -> dict:
    """evaluate_retrieval.main on tiny models, quietly; its output as returned."""
    argv = [
        "--teacher_model",
        teacher,
        "--models",
        *map(str, models),
        "--datasets",
        *map(str, datasets),
        "--output_path",
        str(out),
        "--log_level",
        "error",
        *extra,
    ]
    return er.main(argv)


def distill_with_corpus(teacher, tmp_path, corpus, run_name, *extra) -> dict:
    """A tiny student trained on 60 texts: the test queries plus spans of `corpus` (output under tmp_path/out)."""
    queries = queries_file(tmp_path)
    argv = distill_argv(
        teacher,
        tmp_path / "out",
        queries,
        "--train_queries",
        queries,
        f"corpus:{corpus}",
        "--max_train_queries",
        "60",
        "--run_name",
        run_name,
        *extra,
    )
    return distillation.main(argv)["runs"][0]


def evaluate(teacher, models, datasets, out, *extra) -> dict:
    """{(model, dataset): row} of run_evaluation."""
    return {(r["model"], r["dataset"]): r for r in run_evaluation(teacher, models, datasets, out, *extra)["rows"]}


def speed_file(path, student, teacher):
    rows = []
    for model, torch_ms, onnx_ms in ((teacher, 20.0, 5.0), (student, 10.0, 1.0)):
        for backend, ms in (("torch", torch_ms), ("onnx", onnx_ms)):
            rows.append(
                {
                    "model": model,
                    "device": "cpu",
                    "batch_size": 1,
                    "mode": "end_to_end",
                    "variant": "fp32",
                    "backend": backend,
                    "p50_ms": ms,
                    "calls": 6,
                    "speedup": {"median": 20.0 / ms, "min": 20.0 / ms, "max": 20.0 / ms, "per_round": [1, 1]},
                }
            )
    path.write_text(json.dumps({"results": rows}))
    return str(path)


def make_dot_teacher(folder: Path) -> str:
    """A tiny teacher scored by dot product with unnormalised embeddings (as msmarco-bert-base-dot-v5)."""
    path = make_tiny(folder, "bert", seed=7)
    st = SentenceTransformer(path, device="cpu")
    dot = SentenceTransformer(modules=[st[0], st[1]], device="cpu", similarity_fn_name="dot")
    dot.save(str(folder / "dot"))
    return str(folder / "dot")


MANY_QUERIES = {f"q{i}": f"{w} question {i}" for i, w in enumerate(["cat", "rocket", "bread", "lava"] * 6)}


MANY_QRELS = {f"q{i}": {f"d{1 + i % 4}": 1, f"x{i}": 1} for i in range(24)}


def prompted_teacher(folder: Path, base: str, prompt: str) -> str:
    model = SentenceTransformer(base, device="cpu")
    model.prompts = {"query": prompt, "document": "passage: "}
    model.save(str(folder))
    return str(folder)


def distill(out, run, *extra):
    return distillation.main(
        [
            "--teacher_model",
            MINILM,
            "--train_queries",
            str(TRAIN_TSV),
            "--num_dev_queries",
            "200",
            "--per_device_train_batch_size",
            "64",
            "--learning_rate",
            "1e-3",
            "--output_path",
            str(out),
            "--run_name",
            run,
            "--log_level",
            "warning",
            *extra,
        ]
    )["runs"][0]


SCORE_RUN = ["--num_layers", "2", "--max_train_queries", "1000", "--eval_steps", "8"]


def renamed(folder, mapping):
    """A copy of a BEIR folder with its document ids renamed (qrels too)."""
    docs = {mapping[d]: v for d, v in MORE_DOCS.items()}
    qrels = {q: {mapping[d]: s for d, s in r.items()} for q, r in MANY_QRELS.items()}
    return make_beir(folder, docs, MANY_QUERIES, qrels)


def cosine_rows(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def make_beir(folder, docs, queries, qrels, split="test"):
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for did, (title, text) in docs.items():
            f.write(json.dumps({"_id": did, "title": title, "text": text}) + "\n")
    with open(folder / "queries.jsonl", "w") as f:
        for qid, text in queries.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    with open(folder / "qrels" / f"{split}.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, rels in qrels.items():
            for did, s in rels.items():
                f.write(f"{qid}\t{did}\t{s}\n")
    return folder
