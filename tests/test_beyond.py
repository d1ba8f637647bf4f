"""Beyond layer pruning, on real data: score distillation, query augmentation, static students, asymmetric folders."""

import json

import numpy as np
import pytest
from conftest import DATA, MINILM, TRAIN_TSV, needs_data
from sentence_transformers import SentenceTransformer
from test_retrieval import DOCS, make_beir

import cache
import common
import data
import distillation
import evaluate_retrieval as er
import loading
import losses
import students
import training_text


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


def test_loss_spec_parsing():
    assert losses.parse_loss("mse") == {"mse": 1.0}
    assert losses.parse_loss("mse:1.0,kl:5") == {"mse": 1.0, "kl": 5.0}
    with pytest.raises(Exception, match="unknown loss term"):
        losses.parse_loss("mse,foo:1")
    with pytest.raises(SystemExit):
        distillation.parse_args(["--loss", "mse,kl:5"])  # kl needs --score_corpus


def test_augment_is_seeded_and_perturbs():
    texts = ["what is the capital of france", "cats"]
    a = training_text.augment_queries(texts, 3, "[MASK]", seed=1)
    assert a == training_text.augment_queries(texts, 3, "[MASK]", seed=1) and len(a) == 6
    assert all(v != texts[i // 3] for i, v in enumerate(a[:3]))
    assert a[3:] == ["[MASK]"] * 3  # one-word queries can only be masked


@pytest.mark.slow
@needs_data
def test_kl_term_lowers_heldout_kl(shared_output):
    """mse + kl against the teacher's Cranfield document embeddings: held-out KL to the teacher falls."""
    m = distill(
        shared_output,
        "kl",
        "--num_layers",
        "2",
        "--max_train_queries",
        "1000",
        "--eval_steps",
        "8",
        "--loss",
        "mse:1.0,kl:5.0",
        "--score_corpus",
        str(DATA / "cranfield"),
    )
    assert m["dev_kl"] < 0.8 * m["initial_dev_kl"], m
    kls = [h["eval_dev_negative_kl"] for h in m["log_history"] if "eval_dev_negative_kl" in h]
    assert len(kls) >= 2 and -kls[-1] < m["initial_dev_kl"]


@pytest.mark.slow
@needs_data
def test_margin_mse_from_corpus(shared_output):
    """margin_mse alone: on unseen queries, the student's top-1 vs rank-5 margin moves toward the teacher's."""
    import torch

    m = distill(
        shared_output,
        "margin",
        "--num_layers",
        "2",
        "--max_train_queries",
        "1000",
        "--num_train_epochs",
        "3",
        "--loss",
        "margin_mse:1.0",
        "--score_corpus",
        str(DATA / "cranfield"),
    )
    assert np.isfinite(m["train_loss"])
    teacher, path = loading.load_model(MINILM)
    corpus, file = data.load_corpus(DATA / "cranfield")
    docs, _, _ = cache.teacher_index(teacher, MINILM, path, corpus, file, shared_output)
    docs = torch.as_tensor(np.asarray(docs))
    # the last 200 queries of the file: the seeded 1000-query sample of 92k almost surely misses them
    unseen = [line.split("\t")[1] for line in TRAIN_TSV.read_text().splitlines()[-200:]]
    t = teacher.encode_query(unseen, convert_to_tensor=True)
    ranked = (t @ docs.T).argsort(dim=1, descending=True)
    top, fifth = docs[ranked[:, 0]], docs[ranked[:, 4]]

    def margin_error(model):
        q = model.encode_query(unseen, convert_to_tensor=True)
        return float(((((q - t) * top).sum(-1) - ((q - t) * fifth).sum(-1)) ** 2).mean())

    before = students.layer_reduced_student(teacher, [0, 5])
    assert margin_error(SentenceTransformer(m["final_path"], device="cpu")) < margin_error(before)


@pytest.mark.slow
@needs_data
def test_augmented_run_trains_on_labelled_variants(shared_output):
    m = distill(shared_output, "aug", "--num_layers", "2", "--max_train_queries", "300", "--augment", "2")
    assert m["augmented_variants"] == 600 and m["train_texts"] == 900
    labels = list((shared_output / "labels").rglob("*.texts.json"))
    assert any(len(json.loads(p.read_text())) == 900 for p in labels), "the 900 texts were labelled by the teacher"


@pytest.mark.slow
@needs_data
def test_static_student_and_asymmetric_folder(shared_output, tmp_path):
    m = distill(
        shared_output,
        "static",
        "--student_model_init",
        "static",
        "--max_train_queries",
        "2000",
        "--learning_rate",
        "1e-2",
        "--save_asymmetric",
    )
    assert m["dev_cosine"] > m["initial_dev_cosine"] > 0.4
    static = SentenceTransformer(m["final_path"], device="cpu")
    assert type(static[0]).__name__ == "StaticEmbedding" and static.get_embedding_dimension() == 384

    asym = SentenceTransformer(str(shared_output / "static" / "asymmetric"), device="cpu")
    teacher, _ = loading.load_model(MINILM)
    q, d = ["what causes tides", "cats and dogs"], ["The moon's gravity causes tides.", "A dog barks."]
    assert np.allclose(asym.encode_query(q), static.encode_query(q), atol=1e-5)
    assert np.allclose(asym.encode_document(d), teacher.encode_document(d), atol=1e-5)

    folder = make_beir(
        tmp_path / "tiny", DOCS, {"q1": "purring mammal", "q2": "rocket thrust"}, {"q1": {"d1": 1}, "q2": {"d2": 1}}
    )
    asym_path = str(shared_output / "static" / "asymmetric")
    out = er.main(
        [
            "--teacher_model",
            MINILM,
            "--models",
            m["final_path"],
            asym_path,
            "--datasets",
            str(folder),
            "--output_path",
            str(tmp_path / "o"),
            "--log_level",
            "warning",
        ]
    )
    rows = {r["model"]: r["metrics"] for r in out["rows"]}
    assert rows[m["final_path"]] == rows[asym_path]


@pytest.mark.slow
@needs_data
def test_margin_triples_file(shared_output, tmp_path, capsys):
    """Published-format triples (ids resolved through the query file and a collection): margins move to targets."""
    import random

    import torch

    rng = random.Random(0)
    qids = [line.split("\t")[0] for line in TRAIN_TSV.read_text().splitlines()[:600]]
    corpus, _ = data.load_corpus(DATA / "cranfield")
    pids = sorted(corpus)[:200]
    (tmp_path / "coll.tsv").write_text("".join(f"{p}\t{cache.doc_text(corpus[p])}\n" for p in pids))
    # targets: the passage with the smaller id is always preferred by 4 logits
    lines = []
    for q in qids:
        a, b = sorted(rng.sample(pids, 2), key=int)
        lines.append(f"9.0\t5.0\t{q}\t{a}\t{b}\n")
    (tmp_path / "triples.tsv").write_text("".join(lines))
    m = distill(
        shared_output,
        "triples",
        "--num_layers",
        "2",
        "--loss",
        "margin_mse:1.0",
        "--margin_triples",
        str(tmp_path / "triples.tsv"),
        "--triples_collection",
        str(tmp_path / "coll.tsv"),
        "--margin_scale",
        "0.05",
        "--learning_rate",
        "5e-4",
    )
    assert m["train_texts"] <= 600 and np.isfinite(m["train_loss"])
    teacher, _ = loading.load_model(MINILM)
    before = students.layer_reduced_student(teacher, [0, 5])
    after = SentenceTransformer(m["final_path"], device="cpu")
    docs = teacher.encode_document([cache.doc_text(corpus[p]) for p in pids], convert_to_tensor=True)
    row = {p: i for i, p in enumerate(pids)}
    id2q = data.read_queries(TRAIN_TSV)
    trip = [line.split("\t") for line in lines[:200]]
    qs = [id2q[t[2]] for t in trip]
    pos = torch.tensor([row[t[3]] for t in trip])
    neg = torch.tensor([row[t[4].strip()] for t in trip])

    def margin_error(model):
        q = model.encode_query(qs, convert_to_tensor=True)
        return float((((q * docs[pos]).sum(-1) - (q * docs[neg]).sum(-1) - 0.2) ** 2).mean())

    assert margin_error(after) < margin_error(before)

    (tmp_path / "bad.tsv").write_text("9.0\tx\t1\t2\t3\n")
    with pytest.raises(SystemExit) as e:
        argv = [
            "--teacher_model",
            MINILM,
            "--train_queries",
            str(TRAIN_TSV),
            "--loss",
            "margin_mse",
            "--margin_triples",
            str(tmp_path / "bad.tsv"),
            "--triples_collection",
            str(tmp_path / "coll.tsv"),
            "--output_path",
            str(tmp_path / "o"),
            "--log_level",
            "error",
        ]
        common.cli(distillation.main, argv)
    assert e.value.code == 2 and "scores must be numbers" in capsys.readouterr().err
