"""Beyond layer pruning, on real data: score distillation, query augmentation, static students, asymmetric folders."""

import json

import numpy as np
import pytest
from conftest import DATA, MINILM, TRAIN_TSV, needs_data
from sentence_transformers import SentenceTransformer
from test_retrieval import DOCS, make_beir

import distillation
import evaluate_retrieval as er
from qdistill import cli, data, encoders, losses, students, teacher_outputs, training_text


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


SCORE_RUN = ["--num_layers", "2", "--max_train_queries", "1000", "--eval_steps", "8"]


@pytest.fixture(scope="module")
def cranfield_scoring(shared_output):
    """Cranfield's teacher document embeddings and two query sets with the teacher's embeddings of them: 200 of
    the score-term runs' training queries (the same seeded sample) and 200 unseen ones."""
    import torch

    teacher, path = encoders.load_model(MINILM)
    corpus, file = data.load_corpus(DATA / "cranfield")
    docs, _, _ = teacher_outputs.teacher_index(teacher, MINILM, path, corpus, file, shared_output)
    train, _, _ = training_text.training_texts([TRAIN_TSV], [], None, 200, 1000, 0.6, 42)
    # the last 200 queries of the file: the seeded 1000-query sample of 92k almost surely misses them
    unseen = [line.split("\t")[1] for line in TRAIN_TSV.read_text().splitlines()[-200:]]
    sets = {
        name: (texts, teacher.encode_query(texts, convert_to_tensor=True))
        for name, texts in (("train", train[:200]), ("unseen", unseen))
    }
    return teacher, torch.as_tensor(np.asarray(docs)), sets


@pytest.fixture(scope="module")
def mse_student(shared_output):
    """The same student, queries and steps as the score-term runs, trained by MSE alone: what a score term must
    beat on its own objective (an untrained copy is beaten by any training at all)."""
    return SentenceTransformer(distill(shared_output, "mse-1000", *SCORE_RUN, "--loss", "mse:1.0")["final_path"])


@pytest.mark.slow
@needs_data
def test_kl_term_lowers_the_kl_it_trains_below_mse_alone(shared_output, cranfield_scoring, mse_student):
    """mse + kl against the teacher's Cranfield document embeddings: on the training queries, the KL it trains
    (teacher top-32 + 32 random candidates, temperature 0.05) ends well below that of MSE alone (measured 0.072 vs
    0.114), so a broken or silent KL term fails. Measured, not asserted: on unseen queries it is not lower
    (0.208 vs 0.194): at 1,000 queries the term fits its training queries' rankings and no more."""
    import torch

    m = distill(shared_output, "kl", *SCORE_RUN, "--loss", "mse:1.0,kl:5.0", "--score_corpus", str(DATA / "cranfield"))
    assert m["dev_kl"] < 0.8 * m["initial_dev_kl"], m
    teacher, docs, sets = cranfield_scoring
    texts, t = sets["train"]
    top = (t @ docs.T).topk(32, dim=1).indices
    cand = docs[
        torch.cat([top, torch.randint(0, len(docs), (len(texts), 32), generator=torch.Generator().manual_seed(0))], 1)
    ]

    def candidate_kl(model):
        q = model.encode_query(texts, convert_to_tensor=True)
        p = torch.log_softmax(torch.einsum("bd,bkd->bk", t, cand) / 0.05, -1)
        log_s = torch.log_softmax(torch.einsum("bd,bkd->bk", q, cand) / 0.05, -1)
        return float((p.exp() * (p - log_s)).sum(-1).mean())

    with_kl, mse_only = candidate_kl(SentenceTransformer(m["final_path"], device="cpu")), candidate_kl(mse_student)
    assert with_kl < 0.8 * mse_only, (with_kl, mse_only)


@pytest.mark.slow
@needs_data
def test_margin_mse_alone_trains_the_margins(shared_output, cranfield_scoring, mse_student):
    """margin_mse alone (no embedding term: any change comes from it): the top-1 vs rank-5 margin error falls
    well below the untrained copy's on training and unseen queries (a silent or sign-flipped term fails).
    Measured, not asserted: MSE alone fits those margins better still (unseen 0.0017 vs 0.0031)."""
    m = distill(
        shared_output, "margin", *SCORE_RUN, "--loss", "margin_mse:1.0", "--score_corpus", str(DATA / "cranfield")
    )
    assert np.isfinite(m["train_loss"])
    teacher, docs, sets = cranfield_scoring
    student = SentenceTransformer(m["final_path"], device="cpu")
    before = students.layer_reduced_student(teacher, [0, 5])
    for name, (texts, t) in sets.items():
        ranked = (t @ docs.T).argsort(dim=1, descending=True)
        top, fifth = docs[ranked[:, 0]], docs[ranked[:, 4]]

        def margin_error(model):
            q = model.encode_query(texts, convert_to_tensor=True)
            return float(((((q - t) * top).sum(-1) - ((q - t) * fifth).sum(-1)) ** 2).mean())

        assert margin_error(student) < 0.75 * margin_error(before), (name, margin_error(student), margin_error(before))


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
    teacher, _ = encoders.load_model(MINILM)
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
    (tmp_path / "coll.tsv").write_text("".join(f"{p}\t{teacher_outputs.doc_text(corpus[p])}\n" for p in pids))
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
    teacher, _ = encoders.load_model(MINILM)
    before = students.layer_reduced_student(teacher, [0, 5])
    after = SentenceTransformer(m["final_path"], device="cpu")
    docs = teacher.encode_document([teacher_outputs.doc_text(corpus[p]) for p in pids], convert_to_tensor=True)
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
        cli.cli(distillation.main, argv)
    assert e.value.code == 2 and "scores must be numbers" in capsys.readouterr().err
