"""distillation.py: main([...]) on tiny and real models, flags, runs, torchrun."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, MINILM, MPNET, ROOT, TRAIN_TSV, distill_real, make_tiny, needs_data
from helpers import (
    DOCS,
    MORE_DOCS,
    QRELS,
    QUERIES,
    cosine_rows,
    distill,
    distill_argv,
    evaluate,
    exit_2,
    make_beir,
    queries_file,
    write,
)
from sentence_transformers import SentenceTransformer

import distillation
import evaluate_retrieval as er
import evaluate_speed as es
from qdistill import (
    cli,
    data,
    encoders,
    losses,
    run_files,
    students,
    teacher_outputs,
    training_text,
)
from qdistill.cli import UsageError


def _args(tiny, out, queries, *extra):
    return [
        "--teacher_model",
        tiny,
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
        "--log_level",
        "error",
        *extra,
    ]


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


def test_score_corpus_marks_in_domain_and_a_corpus_source_without_text_is_refused(tiny_bert, tmp_path, capsys):
    a = make_beir(tmp_path / "a", MORE_DOCS, QUERIES, QRELS)
    b = make_beir(tmp_path / "b", DOCS, {"q9": "bread yeast"}, {"q9": {"d3": 1}})
    qfile = queries_file(tmp_path)
    scored = distillation.main(
        distill_argv(
            tiny_bert,
            tmp_path / "out",
            qfile,
            "--loss",
            "mse:1.0,kl:1.0",
            "--score_corpus",
            str(a),
            "--run_name",
            "kl",
            "--kl_top_k",
            "2",
            "--kl_negatives",
            "2",
        )
    )["runs"][0]
    share0 = ["--train_queries", qfile, f"corpus:{b}", "--corpus_text_share", "0", "--max_train_queries", "60"]
    # was: corpus spans filled a short query file anyway, and the collection was marked in-domain
    with pytest.raises(SystemExit) as e:
        distillation.main(distill_argv(tiny_bert, tmp_path / "out", qfile, *share0))
    assert e.value.code == 2 and "--corpus_text_share 0 gives corpus:" in capsys.readouterr().err
    blank = make_beir(tmp_path / "blank", {"e1": ("", " "), "e2": ("", "")}, {"q9": "x"}, {"q9": {"e1": 1}})
    argv = distill_argv(tiny_bert, tmp_path / "out", qfile, "--train_queries", qfile, f"corpus:{blank}")
    exit_2(distillation.main, [*argv, "--max_train_queries", "60", "--run_name", "blank"], capsys, "no text")
    assert not (tmp_path / "out" / "blank").exists()
    record = run_files.text_sources(scored["final_path"])
    assert [c["role"] for c in record["corpora"]] == ["score corpus"]
    rows = evaluate(tiny_bert, [scored["final_path"]], [a, b], tmp_path / "out")
    assert (
        rows[(scored["final_path"], "a")]["in_domain_text"] and not rows[(scored["final_path"], "b")]["in_domain_text"]
    )


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--token_loss_weight", "nan"], "--token_loss_weight must be a finite number"),
        (["--align_loss_weight", "-1"], "--align_loss_weight must be a finite number"),
        (["--align_loss_weight", "1", "--student_model_init", "static"], "--align_loss_weight needs"),
        (["--loss", "mse:nan"], "must be a finite number > 0"),
        (["--span_words", "5", "3"], "--span_words MIN MAX: 5 > 3"),
    ],
)
def test_nan_weights_and_reversed_spans_exit_2(tiny_bert, tmp_path, capsys, extra, match):
    with pytest.raises(SystemExit) as e:
        distillation.parse_args(distill_argv(tiny_bert, tmp_path, "q.tsv", *extra))
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_a_second_gpu_is_selected_with_cuda_visible_devices(tiny_bert, tmp_path):
    args = distillation.parse_args(distill_argv(tiny_bert, tmp_path, queries_file(tmp_path), "--device", "cuda:1"))
    with pytest.raises(cli.UsageError, match="CUDA_VISIBLE_DEVICES=1"):
        distillation.check_inputs(args, "cuda:1")


@pytest.mark.slow
@needs_data
def test_augmented_run_trains_on_labelled_variants(shared_output):
    m = distill(shared_output, "aug", "--num_layers", "2", "--max_train_queries", "300", "--augment", "2")
    assert m["augmented_variants"] == 600 and m["train_texts"] == 900
    labels = list((shared_output / "labels").rglob("*.texts.json"))
    assert any(len(json.loads(p.read_text())) == 900 for p in labels), "the 900 texts were labelled by the teacher"


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--weight_decay", "nan"], "--weight_decay"),
        (["--weight_decay", "-5"], "--weight_decay"),
        (["--seed", "-1"], "--seed"),
        (["--max_seq_length", "1"], "--max_seq_length must be >= 3"),
        (["--layers", "0", "0"], "distinct teacher layer ids"),
    ],
)
def test_bad_training_flags_exit_2_before_anything_runs(pair, tmp_path, capsys, extra, match):
    q = write(tmp_path / "q.tsv", "1\tx\n2\ty\n")
    with pytest.raises(SystemExit) as e:
        distillation.main(distill_argv(pair[0], tmp_path / "out", q, *extra))
    assert e.value.code == 2 and match in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_push_to_hub_without_the_hub_fails_before_training(pair, tmp_path, capsys):
    q = write(tmp_path / "q.tsv", "".join(f"{i}\tquery {i}\n" for i in range(40)))
    argv = distill_argv(pair[0], tmp_path / "out", q, "--push_to_hub", "--hub_model_id", "me/s", "--run_name", "r")
    exit_2(distillation.main, argv, capsys, "--push_to_hub me/s")
    assert not (tmp_path / "out" / "r").exists() and not (tmp_path / "out" / "labels").exists()


@pytest.mark.slow
@needs_data
def test_torchrun_two_processes_train_once_and_write_once(tmp_path):
    queries = tmp_path / "q.tsv"
    queries.write_text("".join(TRAIN_TSV.read_text().splitlines(keepends=True)[:600]))
    corpus, _ = data.load_corpus(DATA / "cranfield")
    coll = tmp_path / "coll.tsv"  # a small score corpus: its teacher index is built sharded across the 2 ranks
    coll.write_text("".join(f"{d}\t{teacher_outputs.doc_text(corpus[d])}\n" for d in sorted(corpus)[:300]))
    common = [
        "--teacher_model",
        MINILM,
        "--num_layers",
        "2",
        "--train_queries",
        str(queries),
        "--num_dev_queries",
        "50",
        "--learning_rate",
        "1e-3",
        "--loss",
        "cosine:1.0,kl:1.0",
        "--eval_steps",
        "4",
        "--num_train_epochs",
        "1",
        "--score_corpus",
        str(coll),
        "--log_level",
        "info",
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "distillation.py",
            *common,
            "--per_device_train_batch_size",
            "32",
            "--output_path",
            str(tmp_path / "ddp"),
            "--run_name",
            "r",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    # a missing query file: rank 0 finds it, and every rank exits 2 with the same one line (no gloo traceback)
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "distillation.py",
            *common,
            "--train_queries",
            str(tmp_path / "missing.tsv"),
            "--output_path",
            str(tmp_path / "bad"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode != 0 and len(errors) == 2 and "missing.tsv" in errors[0], bad.stderr[-2000:]
    # torchrun's own report: the first rank out exited 2 (not aborted, not timed out in a collective); torchrun
    # then stops the other, which has printed the same line
    assert "exitcode  : 2" in bad.stderr and "exitcode  : -6" not in bad.stderr, bad.stderr[-2000:]
    assert "gloo" not in bad.stderr.lower(), bad.stderr[-2000:]
    # train and dev labels, computed once (shared by 2 ranks)
    assert log.count("qdistill.teacher_outputs: labelled") == 2
    assert log.count("2 process(es)") == 2
    runs = list((tmp_path / "ddp").glob("*/final"))
    assert [p.parent.name for p in runs] == ["r"] and (tmp_path / "ddp" / "r" / "config.json").exists()
    ddp = json.loads((tmp_path / "ddp" / "r" / "metrics.json").read_text())
    assert ddp["world_size"] == 2 and ddp["config"]["world_size"] == 2 and ddp["teacher_label_runs"] == 2
    argv = [
        *common,
        "--per_device_train_batch_size",
        "64",
        "--output_path",
        str(tmp_path / "single"),
        "--run_name",
        "r",
        "--log_level",
        "warning",
    ]
    single = distillation.main(argv)["runs"][0]
    # the same global batch: DDP drops the uneven last batch (8 steps vs 9), so close, not equal
    assert abs(ddp["train_steps"] - single["train_steps"]) <= 1
    assert abs(ddp["dev_mse"] - single["dev_mse"]) < 0.15 * single["dev_mse"], (ddp["dev_mse"], single["dev_mse"])
    assert ddp["dev_mse"] < 0.8 * ddp["initial_dev_mse"]
    (a,), (b,) = (list((tmp_path / run).glob("index/*/*/embeddings.npy")) for run in ("ddp", "single"))
    assert cosine_rows(np.load(a), np.load(b)).min() >= 0.9999, "the sharded index equals the single-process one"


@pytest.mark.parametrize(
    "n,strategy,expected",
    [
        (2, "top_bottom", [0, 11]),
        (4, "top_bottom", [0, 1, 10, 11]),
        (1, "top_bottom", [11]),
        (3, "top_bottom", [0, 10, 11]),
        (2, "bottom", [0, 1]),
        (2, "top", [10, 11]),
        (4, "uniform", [0, 4, 7, 11]),
        (12, "top_bottom", list(range(12))),
    ],
)
def test_choose_layers_presets(n, strategy, expected):
    assert students.choose_layers(12, n, strategy) == expected


def test_choose_layers_out_of_range():
    with pytest.raises(UsageError, match="out of range"):
        students.choose_layers(6, 7)


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert", "mpnet"])
def test_layer_reduction_keeps_chosen_layers_and_reloads(arch, tmp_path):
    teacher = SentenceTransformer(make_tiny(tmp_path / "t", arch, layers=4), device="cpu")
    student = students.layer_reduced_student(teacher, [0, 3])
    t_layers = students.find_layers(teacher[0].auto_model)[3]
    s_layers = students.find_layers(student[0].auto_model)[3]
    assert len(s_layers) == 2 and len(t_layers) == 4  # the teacher is untouched
    for s, t in zip(s_layers, [t_layers[0], t_layers[3]]):
        for (_, ps), (_, pt) in zip(s.named_parameters(), t.named_parameters()):
            assert torch.equal(ps, pt)
    student.save(str(tmp_path / "s"))
    again = SentenceTransformer(str(tmp_path / "s"), device="cpu")
    assert len(students.find_layers(again[0].auto_model)[3]) == 2
    x = ["a query about cats"]
    assert np.allclose(again.encode_query(x), student.encode_query(x), atol=1e-5)


def test_bad_layer_ids(tiny_bert):
    teacher = SentenceTransformer(tiny_bert, device="cpu")
    with pytest.raises(UsageError, match="out of range"):
        students.layer_reduced_student(teacher, [0, 4])
    with pytest.raises(UsageError, match="duplicates"):
        students.layer_reduced_student(teacher, [1, 1])


def test_unsupported_architecture():
    with pytest.raises(UsageError, match="unsupported architecture"):
        students.find_layers(torch.nn.Linear(2, 2))


def test_read_queries_formats_and_cleaning(tmp_path):
    tsv = write(tmp_path / "q.tsv", "1\tWhat is  a cat\n2\twhat is a cat\n3\t \n4\tdogs\n")
    jsonl = write(tmp_path / "q.jsonl", '{"_id": "a", "text": "x y"}\n')
    txt = write(tmp_path / "q.txt", "one query\n\nanother\n")
    assert data.clean_queries(data.read_queries(tsv).values()) == ["What is a cat", "dogs"]
    assert data.read_queries(jsonl) == {"a": "x y"}
    assert list(data.read_queries(txt).values()) == ["one query", "another"]


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("bad.tsv", "1\ta\tb\n", "expected 'id<TAB>text'"),
        ("bad.jsonl", '{"_id": 1}\n', 'no "text" string'),
        ("bad2.jsonl", '{"_id": 1, \n', "malformed jsonl"),
    ],
)
def test_malformed_query_files(tmp_path, name, content, match):
    with pytest.raises(UsageError, match=match):
        data.read_queries(write(tmp_path / name, content))


def test_cli_errors_exit_2_with_one_line(tiny_bert, tmp_path, capsys):
    cases = [
        (["--train_queries", str(tmp_path / "missing.tsv")], "not found"),
        (["--train_queries", write(tmp_path / "empty.tsv", "1\t \n2\t\t\n"[:6])], "no training queries"),
        (["--layers", "0", "9"], "out of range"),
        (["--teacher_model", "nobody/no-such-model"], "cannot load model"),
        (["--output_path", write(tmp_path / "afile", "x") + "/sub"], "not writable"),
    ]
    queries = write(tmp_path / "q.tsv", "".join(f"{i}\tquery number {i}\n" for i in range(60)))
    for extra, match in cases:
        argv = _args(tiny_bert, tmp_path / "out", queries, *extra)
        with pytest.raises(SystemExit) as e:
            cli.cli(distillation.main, argv)
        assert e.value.code == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and match in err[0], err
    assert not any((tmp_path / "out").glob("*/final")), "no half-written outputs"


def test_refuses_to_overwrite_and_projection_student(tiny_bert, tmp_path):
    """A 16-d pretrained student of a 32-d teacher gets a Dense projection and reloads at 32-d."""
    small = make_tiny(tmp_path / "small", "bert", hidden=16, layers=1)
    queries = write(tmp_path / "q.tsv", "".join(f"{i}\tquery number {i} about topic {i % 7}\n" for i in range(80)))
    argv = _args(
        tiny_bert,
        tmp_path / "out",
        queries,
        "--student_model_init",
        "pretrained",
        "--student_model_init_list",
        small,
        "--run_name",
        "proj",
        "--per_device_train_batch_size",
        "8",
    )
    out = distillation.main(argv)["runs"][0]
    final = SentenceTransformer(out["final_path"], device="cpu")
    assert final.get_embedding_dimension() == 32
    assert any(type(m).__name__ == "Dense" for m in final)
    assert out["run_dir"] == str(tmp_path / "out" / "proj" / "st"), "pretrained students run as <run_name>/<student>"
    saved = json.loads((tmp_path / "out" / "proj" / "st" / "config.json").read_text())
    assert saved["args"]["student_model_init"] == "pretrained" and saved["versions"]["torch"]
    with pytest.raises(UsageError, match="not empty"):
        distillation.main(argv)


def test_held_out_dev_is_disjoint_and_seeded(tmp_path):
    queries = write(tmp_path / "q.tsv", "".join(f"{i}\tquery {i}\n" for i in range(200)))
    train, dev = training_text.train_and_dev_queries([queries], num_dev=20, max_train=50, seed=42)
    assert len(dev) == 20 and len(train) == 50 and not set(train) & set(dev)
    assert (train, dev) == training_text.train_and_dev_queries([queries], num_dev=20, max_train=50, seed=42)
    dev_file = write(tmp_path / "dev.tsv", "a\tquery 1\nb\tquery 2\n")
    train, dev = training_text.train_and_dev_queries([queries], dev_file=dev_file)
    assert dev == ["query 1", "query 2"] and "query 1" not in train and len(train) == 198


@pytest.mark.slow
@needs_data
def test_real_minilm_distillation(minilm_student, shared_output):
    m = minilm_student
    # the trained student is far closer to the teacher than the untrained 2-layer cut
    assert m["dev_mse"] < 0.6 * m["initial_dev_mse"], m
    assert m["dev_cosine"] > m["initial_dev_cosine"] + 0.1
    student = SentenceTransformer(m["final_path"], device="cpu")
    assert student[0].auto_model.config.num_hidden_layers == 2
    assert student.get_embedding_dimension() == 384
    saved = json.loads((shared_output / "minilm-L2" / "metrics.json").read_text())
    assert saved["layers"] == [0, 5] and saved["config"]["git_commit"] is not None
    assert any("eval_dev_negative_mse" in h for h in saved["log_history"])

    # a second student on the same queries reuses the cached labels
    again = distill_real(MINILM, shared_output, "minilm-L01", "--layers", "0", "1", "--num_train_epochs", "0.1")
    assert (again["train_labels_cached"], again["dev_labels_cached"]) == (True, True)


@pytest.mark.slow
@needs_data
def test_real_mpnet_layout(tmp_path):
    """all-mpnet-base-v2 (assembled from its pip parts) pruned to [0, 11], trained briefly, reloaded."""
    out = distillation.main(
        [
            "--teacher_model",
            MPNET,
            "--layers",
            "0",
            "11",
            "--train_queries",
            str(TRAIN_TSV),
            "--max_train_queries",
            "128",
            "--num_dev_queries",
            "32",
            "--per_device_train_batch_size",
            "32",
            "--output_path",
            str(tmp_path),
            "--run_name",
            "mpnet",
            "--log_level",
            "warning",
        ]
    )["runs"][0]
    student = SentenceTransformer(out["final_path"], device="cpu")
    assert student[0].auto_model.config.num_hidden_layers == 2
    assert student.get_embedding_dimension() == 768
    assert type(student[0].auto_model).__name__ == "MPNetModel"


def test_set_dropout_reaches_modules_and_saved_config(tiny_bert, tmp_path):
    student = SentenceTransformer(tiny_bert, device="cpu")
    students.set_dropout(student, 0.0)
    assert all(m.p == 0.0 for m in student.modules() if isinstance(m, torch.nn.Dropout))
    student.save(str(tmp_path / "s"))
    again = SentenceTransformer(str(tmp_path / "s"), device="cpu")
    assert again[0].auto_model.config.hidden_dropout_prob == 0.0
    assert all(m.p == 0.0 for m in again.modules() if isinstance(m, torch.nn.Dropout))


def test_length_grouped_batches_cover_every_text_once_per_epoch_with_little_padding():

    from qdistill import batching

    class Tok:  # token ids = words; what the sampler needs from a tokenizer
        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [t.split() for t in texts]}

    rng = random.Random(0)
    texts = [" ".join(["w"] * rng.randint(2, 60)) for _ in range(1000)]
    sampler = batching.length_grouped(Tok(), texts, max_length=40)(texts, batch_size=32, drop_last=False, seed=7)
    lengths = [min(len(t.split()), 40) for t in texts]

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    epoch0 = list(sampler)
    assert sorted(i for b in epoch0 for i in b) == list(range(1000)) and len(epoch0) == len(sampler) == 32
    shuffled = list(range(1000))
    rng.shuffle(shuffled)
    random_batches = [shuffled[i : i + 32] for i in range(0, 1000, 32)]
    assert padded(epoch0) < 0.8 * padded(random_batches), "grouping removes most of the padding"
    assert list(sampler) == epoch0, "the same epoch replays the same batches (resume)"
    sampler.set_epoch(1)
    assert list(sampler) != epoch0


def test_length_grouping_reads_a_static_students_tokenizer():
    from types import SimpleNamespace

    from tokenizers import Tokenizer, models, pre_tokenizers

    from qdistill import batching

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    texts = ["a b a", "b", "a a a a a a"]
    sampler = batching.length_grouped(tok, texts, None)(texts, batch_size=2, drop_last=False)
    assert sampler.lengths == [3, 1, 6] and sorted(i for b in sampler for i in b) == [0, 1, 2]
    # a static student's max_seq_length is inf: no limit, as for the sampler above
    assert encoders.length_limit(SimpleNamespace(max_seq_length=float("inf"))) is None
    assert encoders.length_limit(SimpleNamespace(max_seq_length=128)) == 128


def test_freeze_embeddings_holds_for_a_pretrained_student_and_is_refused_for_static(tiny_bert, tmp_path, capsys):
    """A pretrained student (e.g. an earlier run's final/, for staged training) keeps its token embeddings fixed."""
    small = make_tiny(tmp_path / "small", "bert", hidden=32, layers=1, seed=3)
    queries = write(tmp_path / "q.tsv", "".join(f"{i}\tquery number {i} about topic {i % 7}\n" for i in range(80)))
    argv = _args(
        tiny_bert,
        tmp_path / "out",
        queries,
        "--student_model_init",
        "pretrained",
        "--student_model_init_list",
        small,
        "--run_name",
        "frozen",
        "--freeze_embeddings",
        "--learning_rate",
        "1e-2",
        "--per_device_train_batch_size",
        "8",
    )
    out = distillation.main(argv)["runs"][0]
    before = SentenceTransformer(small, device="cpu")[0].auto_model
    after = SentenceTransformer(out["final_path"], device="cpu")[0].auto_model
    assert torch.equal(before.embeddings.word_embeddings.weight, after.embeddings.word_embeddings.weight)
    layer = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(before.state_dict()[layer], after.state_dict()[layer]), "the rest still trains"
    with pytest.raises(SystemExit) as e:
        distillation.main(
            _args(tiny_bert, tmp_path / "out2", queries, "--student_model_init", "static", "--freeze_embeddings")
        )
    assert e.value.code == 2 and "nothing to train" in capsys.readouterr().err


def test_a_static_table_trains_as_a_pretrained_student(tiny_bert, tmp_path):
    """A static student saved earlier (ours, or model2vec's wrapped in StaticEmbedding) is aligned further as is."""
    queries = write(tmp_path / "q.tsv", "".join(f"{i}\tquery number {i} about topic {i % 7}\n" for i in range(80)))
    first = distillation.main(
        _args(tiny_bert, tmp_path / "out", queries, "--student_model_init", "static", "--run_name", "static")
    )["runs"][0]
    later = write(tmp_path / "q2.tsv", "".join(f"{i}\tanother query {i} on subject {i % 5}\n" for i in range(80)))
    out = distillation.main(
        _args(
            tiny_bert,
            tmp_path / "out",
            later,
            "--student_model_init",
            "pretrained",
            "--student_model_init_list",
            first["final_path"],
            "--run_name",
            "again",
            "--learning_rate",
            "1e-2",
        )
    )["runs"][0]
    final = SentenceTransformer(out["final_path"], device="cpu")
    assert type(final[0]).__name__ == "StaticEmbedding" and out["dev_mse"] <= out["initial_dev_mse"]
    # staged training: the text of every stage counts, so collections of the first stay in-domain
    sources = json.loads((Path(out["final_path"]) / "training_text.json").read_text())
    assert [f["path"] for f in sources["query_files"]] == [str(Path(later).resolve()), str(Path(queries).resolve())]
    assert all(len(f["sha256"]) == 64 for f in sources["query_files"])
    # the text hashes of both stages: the leak guard finds a first-stage query in an evaluation
    assert set(data.text_hashes(["QUERY number 3  about topic 3", "another query 4 on subject 4"])) <= set(
        sources["text_hashes"]
    )
    assert sources["initialised_from"]["model"] == first["final_path"]


@pytest.mark.parametrize("keep, pairs", [([0, 3], [(0, 3)]), ([1, 2, 3], [(0, 2), (1, 3)])])
def test_alignment_matches_each_student_layer_to_the_teacher_state_entering_the_next_kept_layer(tmp_path, keep, pairs):
    """The term is the masked MSE between the student's state after its layer j and the full teacher's
    hidden_states[keep[j + 1]], computed here independently; the hooks it uses are gone after each step."""

    teacher = SentenceTransformer(make_tiny(tmp_path, "mpnet", layers=4, seed=3), device="cpu")
    student = students.layer_reduced_student(teacher, keep)
    torch.manual_seed(0)
    for p in student.parameters():  # the student is no longer the teacher's copy: the term is not zero
        p.data += 0.05 * torch.randn_like(p)
    feats = student.preprocess(["a query about fusion energy", "cheap flights", "x"])
    labels = torch.zeros(3, teacher.get_embedding_dimension())
    plain = losses.make_loss(student, {"mse": 1.0}, labels.shape[1], 0.0, teacher, 0.0, keep)
    aligned = losses.make_loss(student, {"mse": 1.0}, labels.shape[1], 0.0, teacher, 2.0, keep)
    assert aligned.align_pairs == pairs and not hasattr(plain, "align_pairs")
    # only the teacher layers below the last kept one are run on every step
    assert len(students.find_layers(aligned.teacher_hf)[3]) == keep[-1]
    student.eval()
    with torch.no_grad():
        extra = aligned([feats], labels) - losses.QueryDistillLoss(student, {"mse": 1.0}, 384)([feats], labels)
        t_states = teacher[0].auto_model(**losses.hf_inputs(feats), output_hidden_states=True).hidden_states
        s_states = student[0].auto_model(**losses.hf_inputs(feats), output_hidden_states=True).hidden_states
    mask = feats["attention_mask"].unsqueeze(-1).float()
    want = sum(losses.masked_mse(s_states[j + 1], t_states[t], mask) for j, t in pairs) / len(pairs)
    assert float(want) > 1e-4
    assert abs(float(extra) - 2.0 * float(want)) < 1e-5 * max(1.0, float(want))
    assert all(not b._forward_hooks for b in students.find_layers(student[0].auto_model)[3])


def test_alignment_trains_a_student_and_a_one_layer_student_has_nothing_to_align(tiny_bert, tmp_path):
    q = write(tmp_path / "q.tsv", "".join(f"{i}\tquery number {i} about topic {i % 7}\n" for i in range(80)))
    base = ["--teacher_model", tiny_bert, "--train_queries", q, "--num_dev_queries", "16", "--output_path"]
    run = distillation.main([*base, str(tmp_path), "--layers", "0", "3", "--align_loss_weight", "0.5"])["runs"][0]
    config = json.loads((Path(run["run_dir"]) / "config.json").read_text())
    assert config["args"]["align_loss_weight"] == 0.5 and config["recipe"]["flags"]["align_loss_weight"] == 0.5
    assert np.isfinite(run["train_loss"])
    # a one-layer student has no next layer to align: refused (was: silently dropped, recorded as used)
    with pytest.raises(SystemExit) as e:
        distillation.parse_args([*base, str(tmp_path / "one"), "--layers", "3", "--align_loss_weight", "0.5"])
    assert e.value.code == 2 and not (tmp_path / "one").exists()
