"""Each defect found by trying the toolkit as a new user would, with the test that shows it fixed (fast tier)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import BUILDS, MPNET, make_tiny
from sentence_transformers import SentenceTransformer
from test_retrieval import DOCS, make_beir

import distillation
import evaluate_retrieval as er
import evaluate_speed as es
from qdistill import cli, data, encoders, evaluation, losses, metrics, run_files, runs, search
from qdistill.cli import UsageError

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


# ----------------------------------------------------------------------------- 1. results keyed by content


def test_finished_results_are_keyed_by_model_and_data_content(tiny_bert, tmp_path):
    ds = make_beir(tmp_path / "a" / "tiny", DOCS, QUERIES, QRELS)
    student = tmp_path / "student"
    shutil.copytree(make_tiny(tmp_path / "s1", "bert", seed=1), student)

    def run(*datasets):
        out = er.main(
            [
                "--teacher_model",
                tiny_bert,
                "--models",
                str(student),
                "--datasets",
                *map(str, datasets),
                "--output_path",
                str(tmp_path / "out"),
                "--log_level",
                "error",
            ]
        )
        return {(r["model"], r["dataset"]): r for r in out["rows"]}, out["table"]

    first, _ = run(ds)
    assert not any(r["reused"] for r in first.values())
    again, _ = run(ds)
    assert all(r["reused"] for r in again.values()), "nothing changed: finished results are reused"

    shutil.rmtree(student)  # retrained at the same path
    shutil.copytree(make_tiny(tmp_path / "s2", "bert", seed=2), student)
    third, _ = run(ds)
    assert not third[(str(student), "tiny")]["reused"] and third[(tiny_bert, "tiny")]["reused"]

    write(ds / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\n")  # qrels edited
    fourth, _ = run(ds)
    assert not any(r["reused"] for r in fourth.values())
    assert fourth[(tiny_bert, "tiny")]["num_queries"] == 1

    other = make_beir(tmp_path / "b" / "tiny", DOCS, QUERIES, QRELS)  # same basename, another folder
    both, table = run(ds, other)
    assert {d for _, d in both} == {"tiny", "tiny~2"} and "tiny~2 nDCG@10" in table
    assert both[(tiny_bert, "tiny~2")]["num_queries"] == 2 and both[(tiny_bert, "tiny")]["num_queries"] == 1


# ----------------------------------------------------------------------------- 2. k + 1


def test_search_keeps_k_hits_after_dropping_the_querys_own_id():
    docs = search.unit(np.random.default_rng(0).normal(size=(12, 8)))
    doc_ids = [f"x{i}" for i in range(12)]
    ranked = np.argsort(-(docs @ docs[0]))
    assert ranked[0] == 0  # the query is document x0 itself
    relevant = doc_ids[ranked[10]]  # 10th hit once x0 is dropped
    flat = search.build_faiss(docs, "flat")
    results = evaluation.retrieve(lambda q, k: search.search(flat, q, k), docs[[0]], ["x0"], doc_ids, 10)
    assert metrics.evaluate({"x0": {relevant: 1}}, results, [10], own={"x0"})[0]["Recall@10"] == 1.0


# ----------------------------------------------------------------------------- 3. numeric flags


@pytest.mark.parametrize(
    "parse,argv",
    [
        (distillation.parse_args, ["--max_train_queries", "0"]),
        (distillation.parse_args, ["--max_train_queries", "-5"]),
        (distillation.parse_args, ["--per_device_train_batch_size", "0"]),
        (distillation.parse_args, ["--train_batch_size", "0"]),
        (distillation.parse_args, ["--learning_rate", "-1"]),
        (distillation.parse_args, ["--num_train_epochs", "0"]),
        (distillation.parse_args, ["--loss", "mse:0"]),
        (distillation.parse_args, ["--student_dropout", "1.5"]),
        (er.parse_args, ["--datasets", "x", "--k_values", "1", "5"]),
        (er.parse_args, ["--datasets", "x", "--k_values", "0", "10"]),
        (es.parse_args, ["--models", "m", "--queries", "q", "--num_threads", "0"]),
        (es.parse_args, ["--models", "m", "--queries", "q", "--batch_sizes", "-1"]),
    ],
)
def test_bad_numeric_flags_exit_2(parse, argv):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2


def test_original_batch_size_flags_are_aliases():
    args = distillation.parse_args(["--train_batch_size", "7", "--eval_batch_size", "9"])
    assert (args.per_device_train_batch_size, args.per_device_eval_batch_size) == (7, 9)


# ----------------------------------------------------------------------------- 4, 5. run folders, resume


def test_errors_leave_no_run_folder_and_the_corrected_rerun_works(tiny_bert, tmp_path, capsys):
    q = queries_file(tmp_path)
    out = tmp_path / "out"
    exit_2(distillation.main, distill_argv(tiny_bert, out, q, "--fp16", "--device", "cpu"), capsys, "CUDA")
    bad = str(tmp_path / "no-such-checkpoint")
    exit_2(distillation.main, distill_argv(tiny_bert, out, q, "--resume_from_checkpoint", bad), capsys, "checkpoint")
    exit_2(
        distillation.main,
        distill_argv(tiny_bert, out, q, "--resume_from_checkpoint", "latest"),
        capsys,
        "no complete checkpoint",
    )
    exit_2(distillation.main, distill_argv(tiny_bert, out, q, "--layers", "0", "7"), capsys, "out of range")
    assert not [p for p in out.iterdir() if p.name not in ("labels", "index")], "no run folder left behind"
    run = distillation.main(distill_argv(tiny_bert, out, q))["runs"][0]
    assert os.path.isdir(run["final_path"])


def test_resume_latest_skips_a_half_written_checkpoint(tiny_bert, tmp_path):
    q = queries_file(tmp_path)
    argv = distill_argv(tiny_bert, tmp_path / "out", q, "--run_name", "r", "--save_total_limit", "10")
    distillation.main(argv)
    ckpts = tmp_path / "out" / "r" / "checkpoints"
    newest = runs.latest_checkpoint(ckpts)
    assert newest is not None
    half = ckpts / "checkpoint-99999"  # what kill -9 during a save leaves: weights, no trainer_state.json
    shutil.copytree(newest, half)
    (half / "trainer_state.json").unlink()
    assert runs.latest_checkpoint(ckpts) == newest
    again = distillation.main([*argv, "--resume_from_checkpoint", "latest", "--num_train_epochs", "2"])["runs"][0]
    assert again["resumed_from"] == str(newest) and again["train_steps"] > int(newest.name.split("-")[1])


# ----------------------------------------------------------------------------- 6. duplicate ids


def test_duplicate_ids_are_errors(tmp_path):
    folder = make_beir(tmp_path / "dup", DOCS, QUERIES, QRELS)
    with open(folder / "queries.jsonl", "a") as f:
        f.write(json.dumps({"_id": "q1", "text": "another text"}) + "\n")
    with pytest.raises(UsageError, match="duplicate id 'q1'"):
        data.load_beir(folder)
    with pytest.raises(UsageError, match="duplicate id '7'"):
        data.read_queries(write(tmp_path / "q.tsv", "7\ta\n8\tb\n7\tc\n"))


# ----------------------------------------------------------------------------- 7. speed: nothing to time


def test_speed_with_nothing_to_time_exits_2(tmp_path, capsys):
    q = write(tmp_path / "q.tsv", "1\tquery\n")
    argv = [
        "--models",
        "no/model",
        "--queries",
        q,
        "--devices",
        "cpu",
        "--precision",
        "fp16",
        "--output_path",
        str(tmp_path),
    ]
    exit_2(es.main, argv, capsys, "nothing to time")
    plan, notes = es.plan_variants(["cpu", "cuda"], ["fp32", "fp16"], ["none", "int8"], cuda=False)
    assert plan == [("cpu", "fp32"), ("cpu", "int8")] and len(notes) == 2
    plan, _ = es.plan_variants(["cpu", "cuda"], ["fp32", "fp16"], ["none", "int8"], cuda=True)
    assert plan == [("cpu", "fp32"), ("cpu", "int8"), ("cuda", "fp32"), ("cuda", "fp16")]


# ----------------------------------------------------------------------------- 8, 9. checked first, clear messages


def test_model_paths_and_datasets_are_checked_before_any_index(tiny_bert, tmp_path, capsys):
    ds = make_beir(tmp_path / "tiny", DOCS, QUERIES, QRELS)
    builds = BUILDS["index"]
    argv = [
        "--teacher_model",
        tiny_bert,
        "--models",
        str(tmp_path / "typo" / "final"),
        "--datasets",
        str(ds),
        "--output_path",
        str(tmp_path / "out"),
    ]
    exit_2(er.main, argv, capsys, "does not exist")
    assert BUILDS["index"] == builds and not (tmp_path / "out" / "index").exists()


def test_messages_name_the_real_problem(tiny_bert, tmp_path, capsys):
    (tmp_path / "adir.tsv").mkdir()
    with pytest.raises(UsageError, match="is a folder, expected a file"):
        data.read_queries(tmp_path / "adir.tsv")
    afile = write(tmp_path / "afile", "x")
    with pytest.raises(UsageError, match="is a file, expected a BEIR folder"):
        data.dataset_path(afile, tmp_path)
    empty = make_beir(tmp_path / "empty", DOCS, {}, QRELS)
    with pytest.raises(UsageError, match="queries.jsonl holds no queries"):
        data.load_beir(empty)
    run = tmp_path / "run"
    shutil.copytree(tiny_bert, run / "final")
    with pytest.raises(UsageError, match=f"did you mean {run / 'final'}"):
        encoders.resolve_model_path(str(run))


# ----------------------------------------------------------------------------- 10, 11. atomic writes


def test_stale_temp_folders_are_cleaned_and_live_ones_kept(tmp_path):
    target = tmp_path / "index"
    dead = tmp_path / ".index.999999999.abc.tmp"  # no such pid: a killed build's leftover
    live = tmp_path / f".index.{os.getpid()}.xyz.tmp"  # a running writer's: kept
    dead.mkdir()
    live.mkdir()
    with run_files.atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    assert (target / "a").read_text() == "1" and not dead.exists() and live.exists()


def test_atomic_writes_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        run_files.write_json(tmp_path / "a.json", {"x": 1})
        with run_files.atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


# ----------------------------------------------------------------------------- 13. --data_dir for models


def test_data_dir_holds_the_assembled_offline_models(tiny_bert, tmp_path):
    copy = tmp_path / "data" / "models" / "all-mpnet-base-v2"
    shutil.copytree(tiny_bert, copy)  # stands in for the assembled all-mpnet-base-v2
    assert encoders.resolve_model_path(MPNET, tmp_path / "data") == copy
    q = queries_file(tmp_path)
    run = distillation.main(distill_argv(MPNET, tmp_path / "out", q, "--data_dir", str(tmp_path / "data")))
    config = json.loads((tmp_path / "out" / "all-mpnet-base-v2-L0-3" / "config.json").read_text())
    assert config["teacher_path"] == str(copy) and run["runs"][0]["layers"] == [0, 3]


# ----------------------------------------------------------------------------- students and score terms


def test_one_run_per_pretrained_student(tiny_bert, tmp_path):
    a, b = make_tiny(tmp_path / "a", "bert", hidden=16, layers=1), make_tiny(tmp_path / "b", "bert", layers=1)
    argv = distill_argv(
        tiny_bert,
        tmp_path / "out",
        queries_file(tmp_path),
        "--student_model_init",
        "pretrained",
        "--student_model_init_list",
        a,
        b,
        "--run_name",
        "many",
    )
    runs = distillation.main(argv)["runs"]
    # both folders are named "st": the second run gets a distinct, predictable name
    assert [r["run_dir"] for r in runs] == [str(tmp_path / "out" / "many" / n) for n in ("st", "st~2")]
    assert [r["student_init"] for r in runs] == [a, b]
    assert all(SentenceTransformer(r["final_path"]).get_embedding_dimension() == 32 for r in runs)


def test_score_candidates_are_computed_once_and_the_evaluator_leaves_the_loss_alone(tiny_bert, tmp_path, monkeypatch):
    calls = []
    real = search.exact_top_k
    monkeypatch.setattr(search, "exact_top_k", lambda *a, **k: calls.append(1) or real(*a, **k))
    corpus = make_beir(tmp_path / "docs", DOCS, QUERIES, QRELS)
    argv = distill_argv(
        tiny_bert,
        tmp_path / "out",
        queries_file(tmp_path),
        "--loss",
        "mse:1.0,kl:1.0",
        "--score_corpus",
        str(corpus),
        "--kl_top_k",
        "2",
        "--kl_negatives",
        "2",
    )
    run = distillation.main(argv)["runs"][0]
    assert len(calls) == 2 and run["train_steps"] >= 4, "top-k once for train and once for dev, not per step"
    assert np.isfinite(run["dev_kl"])

    student = SentenceTransformer(tiny_bert, device="cpu")
    docs = np.random.default_rng(0).normal(size=(6, 32)).astype(np.float32)
    top = np.array([[5, 1], [2, 3], [4, 0]], np.int64)
    loss = losses.QueryDistillLoss(
        student, {"kl": 1.0}, 32, docs=docs, targets=losses.ScoreTargets(top, None, None), negatives=2
    )
    assert loss.targets.top.dtype == torch.long, "document rows stay integers, never floats beside the embeddings"
    labels = np.random.default_rng(1).normal(size=(3, 32)).astype(np.float32)
    rows = torch.as_tensor(np.concatenate([labels, [[2.0], [0.0], [1.0]]], 1))  # [embedding | training row]
    value = loss([student.preprocess(["a", "b", "c"])], rows)
    assert value.ndim == 0 and torch.isfinite(value)
    score = {"docs": docs, "candidates": np.zeros((3, 4), int), "similarity": "cosine", "temperature": 0.05}
    evaluator = losses.make_evaluator(["a", "b", "c"], labels, 8, score)
    state = loss.gen.get_state().clone()
    evaluator(student)
    assert torch.equal(loss.gen.get_state(), state)
