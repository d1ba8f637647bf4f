"""A teacher known only by its vectors (fast tier: tiny random models, MiniLM's real tokenizer): distillation and
evaluation with no teacher model, the same numbers as the loaded teacher, Matryoshka truncation, and bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny
from helpers import MANY_QRELS, MANY_QUERIES, MORE_DOCS, exit_2, make_beir, write
from sentence_transformers import SentenceTransformer

import distillation
import evaluate_retrieval as er
from qdistill import encoders, search
from qdistill.cli import UsageError


@pytest.fixture(scope="module")
def stand(tmp_path_factory):
    """A tiny teacher T (32-d, cosine), a narrower student S (16-d), a BEIR folder, T's exported index, and T's
    logged query vectors of the evaluated queries and of 120 training queries."""
    root = tmp_path_factory.mktemp("vectors")
    teacher = make_tiny(root / "t", "bert", hidden=32, seed=0)
    student = make_tiny(root / "s", "bert", hidden=16, layers=2, seed=1)
    beir = make_beir(root / "beir", MORE_DOCS, MANY_QUERIES, MANY_QRELS)
    loaded = er.main(
        [
            "--teacher_model",
            teacher,
            "--datasets",
            str(beir),
            "--export_index",
            str(root / "export"),
            "--output_path",
            str(root / "out"),
        ]
        + ["--log_level", "error"]
    )
    model = SentenceTransformer(teacher, device="cpu")
    ids = sorted(MANY_QUERIES)
    np.save(root / "eval.npy", model.encode_query([MANY_QUERIES[i] for i in ids], convert_to_numpy=True))
    write(root / "eval.ids", "".join(f"{i}\n" for i in ids))
    train = {f"t{i}": f"how does topic {i % 9} relate to item {i}" for i in range(120)}
    write(root / "train.tsv", "".join(f"{i}\t{t}\n" for i, t in train.items()))
    np.save(root / "train.npy", model.encode_query(list(train.values()), convert_to_numpy=True))
    write(root / "train.ids", "".join(f"{i}\n" for i in train))
    return {"root": root, "teacher": teacher, "student": student, "beir": beir, "loaded": loaded}


def vectors_eval(stand, out, *extra, models=None):
    root = stand["root"]
    argv = ["--models", *(models or []), "--datasets", str(stand["beir"])]
    argv += ["--doc_index", str(root / "export" / "beir"), "--teacher_query_embeddings", str(root / "eval.npy")]
    argv += ["--teacher_query_ids", str(root / "eval.ids"), "--output_path", str(out), "--log_level", "error"]
    return er.main([*argv, *extra])


def no_teacher_loads(monkeypatch, teacher):
    """Any load of the teacher's folder fails the test: vectors-only runs must never read its weights."""
    real = encoders.load_model
    loaded = []

    def load(name, *args, **kwargs):
        loaded.append(str(kwargs.get("path") or name))
        assert teacher not in loaded[-1], f"the teacher was loaded: {loaded[-1]}"
        return real(name, *args, **kwargs)

    monkeypatch.setattr(encoders, "load_model", load)
    return loaded


def test_vectors_only_evaluation_equals_the_loaded_teacher(stand, tmp_path, monkeypatch):
    """The teacher's numbers from its logged vectors in its exported index equal those of the loaded teacher; the
    teacher model is never loaded; results say `teacher: vectors only` and index_verified false."""
    loaded = {r["model"]: r for r in stand["loaded"]["rows"]}[stand["teacher"]]
    no_teacher_loads(monkeypatch, stand["teacher"])
    copy = shutil.copytree(stand["teacher"], tmp_path / "copy")  # its weights elsewhere: logged = encoded here
    out = vectors_eval(stand, tmp_path / "out", models=[str(copy)])
    rows = {r["model"]: r for r in out["rows"]}
    vec = rows["teacher-vectors"]
    for k in ("NDCG@10", "Recall@100", "MRR@10"):
        assert abs(vec["metrics"][k] - loaded["metrics"][k]) < 1e-4, k
    assert vec["backend"] == "logged vectors" and vec["index_verified"] is False
    assert vec["doc_index"]["teacher"] == "vectors only" and "nothing re-encoded" in vec["doc_index"]["checked"]
    assert "teacher as vectors only" in out["table"]
    # the teacher's own weights, loaded as a student, agree with its logged vectors exactly
    student = rows[str(copy)]
    assert student["agreement"]["overlap@10"]["value"] == pytest.approx(1.0)
    saved = json.loads((tmp_path / "out/retrieval/teacher-vectors/teacher-vectors/beir.json").read_text())
    assert saved["key"]["teacher"] == "vectors only"


def test_truncation_matches_the_loaded_teacher_at_the_same_d(stand, tmp_path):
    """--truncate_dim 32 16 8: one table each; the vectors-only teacher at d equals the loaded teacher at d."""
    out = vectors_eval(stand, tmp_path / "v", "--truncate_dim", "32", "16", "8")
    assert [p for p in ("## d = 32", "## d = 16", "## d = 8") if p in out["table"]] == [
        "## d = 32",
        "## d = 16",
        "## d = 8",
    ]
    root = stand["root"]
    loaded = er.main(
        ["--teacher_model", stand["teacher"], "--datasets", str(stand["beir"]), "--truncate_dim", "16"]
        + ["--output_path", str(root / "out"), "--log_level", "error"]
    )
    vec = {(r["model"], r["key"]["truncate_dim"]): r for r in out["rows"]}
    t16 = {r["model"]: r for r in loaded["rows"]}[stand["teacher"]]
    assert abs(vec[("teacher-vectors", 16)]["metrics"]["NDCG@10"] - t16["metrics"]["NDCG@10"]) < 1e-4
    assert vec[("teacher-vectors", 8)]["metrics"] != vec[("teacher-vectors", 32)]["metrics"]
    assert (tmp_path / "v/retrieval/teacher-vectors/teacher-vectors/beir.d16.json").is_file()


def test_a_matryoshka_index_with_full_logged_vectors(stand, tmp_path):
    """An index holding the teacher's vectors cut to 16 dimensions (renormalised, as an API's MRL output) with the
    full 32-d log: --truncate_dim 16 cuts the queries to meet it, and gives the loaded teacher's numbers at d = 16;
    without the flag, one line names it. Label-free too: agreement rows, no metrics."""
    root = stand["root"]
    import faiss

    full = faiss.read_index(str(root / "export/beir/index"))
    np.save(tmp_path / "d16.npy", search.unit(full.reconstruct_n(0, full.ntotal)[:, :16]))
    shutil.copy(root / "export/beir/docid", tmp_path / "d16.ids")
    argv = ["--datasets", str(stand["beir"]), "--doc_index", str(tmp_path / "d16.npy"), "--doc_ids"]
    argv += [str(tmp_path / "d16.ids"), "--teacher_query_embeddings", str(root / "eval.npy")]
    argv += [
        "--teacher_query_ids",
        str(root / "eval.ids"),
        "--output_path",
        str(tmp_path / "o"),
        "--log_level",
        "error",
    ]
    cut = {r["model"]: r for r in er.main([*argv, "--truncate_dim", "16"])["rows"]}["teacher-vectors"]
    loaded = er.main(
        ["--teacher_model", stand["teacher"], "--datasets", str(stand["beir"]), "--truncate_dim", "16"]
        + ["--output_path", str(root / "out"), "--log_level", "error"]
    )
    t16 = {r["model"]: r for r in loaded["rows"]}[stand["teacher"]]
    assert abs(cut["metrics"]["NDCG@10"] - t16["metrics"]["NDCG@10"]) < 1e-4
    with pytest.raises(UsageError, match="pass --truncate_dim 16"):
        er.main(argv)
    free = er.main([*argv, "--truncate_dim", "16", "--label_free"])
    assert all("metrics" not in r for r in free["rows"])


def distill_vectors(stand, out, *extra):
    root = stand["root"]
    argv = ["--student_model_init", "pretrained", "--student_model_init_list", stand["student"]]
    argv += ["--train_queries", str(root / "train.tsv"), "--teacher_query_embeddings", str(root / "train.npy")]
    argv += ["--teacher_query_ids", str(root / "train.ids"), "--num_dev_queries", "20", "--eval_steps", "4"]
    argv += ["--per_device_train_batch_size", "16", "--num_train_epochs", "1", "--output_path", str(out)]
    return distillation.main([*argv, "--log_level", "error", *extra])["runs"][0]


def test_distillation_from_logged_vectors_alone(stand, tmp_path, monkeypatch):
    """No --teacher_model: a 16-d pretrained student is projected to the log's 32 dimensions (least-squares
    start), trained and saved, and evaluates against the exported index with the logged eval vectors."""
    loaded = no_teacher_loads(monkeypatch, stand["teacher"])
    run = distill_vectors(stand, tmp_path / "out", "--run_name", "vec")
    final = SentenceTransformer(run["final_path"], device="cpu")
    assert final.get_embedding_dimension() == 32 and final.similarity_fn_name == "cosine"
    config = json.loads((Path(run["run_dir"]) / "config.json").read_text())
    assert config["teacher"] == {"vectors_only": True, "name": "vectors-train", "dim": 32, "similarity": "cosine"}
    assert config["teacher_query_embeddings"]["teacher"] == "vectors only"
    assert 0 < run["projection_fit_cosine"] <= 1
    assert loaded == [stand["student"]]  # the student alone was loaded
    out = vectors_eval(stand, tmp_path / "eval", models=[run["final_path"]])
    row = {r["model"]: r for r in out["rows"]}[run["final_path"]]
    assert 0 <= row["retention_ndcg@10"] and row["agreement"]["query_cosine"]["value"] < 1


def test_truncated_labels_train_a_student_of_that_width(stand, tmp_path):
    run = distill_vectors(stand, tmp_path / "out", "--run_name", "d8", "--truncate_dim", "8")
    assert SentenceTransformer(run["final_path"], device="cpu").get_embedding_dimension() == 8


def test_a_symmetric_teacher_labels_documents_by_the_index(stand, tmp_path):
    root = stand["root"]
    extra = ["--teacher_symmetric", "--doc_index", str(root / "export" / "beir"), "--score_corpus", str(stand["beir"])]
    run = distill_vectors(stand, tmp_path / "out", "--run_name", "sym", *extra)
    assert run["index_document_texts"] == len(MORE_DOCS)


def test_a_static_student_on_a_named_tokenizer(stand, tmp_path):
    run = distill_vectors(
        stand, tmp_path / "out", "--run_name", "static", "--student_model_init", "static", "--learning_rate", "0.05"
    )
    final = SentenceTransformer(run["final_path"], device="cpu")
    assert type(final[0]).__name__ == "StaticEmbedding" and final.get_embedding_dimension() == 32


def test_bad_vector_input_is_one_line(stand, tmp_path, capsys):
    root = stand["root"]
    vec = np.load(root / "train.npy")
    bad = vec.copy()
    bad[57, 3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    base = ["--student_model_init", "pretrained", "--student_model_init_list", stand["student"]]
    base += ["--train_queries", str(root / "train.tsv"), "--teacher_query_ids", str(root / "train.ids")]
    base += ["--output_path", str(tmp_path / "o")]
    exit_2(distillation.main, [*base, "--teacher_query_embeddings", str(tmp_path / "nan.npy")], capsys, "row 57")
    good = [*base, "--teacher_query_embeddings", str(root / "train.npy")]
    exit_2(distillation.main, [*good, "--truncate_dim", "64"], capsys, "--truncate_dim 64 is larger than the 32-d")
    with pytest.raises(SystemExit) as e:
        distillation.main([*good, "--student_model_init", "layer_reduction"])
    assert e.value.code == 2 and "layer reduction keeps the teacher's own layers" in capsys.readouterr().err
    write(tmp_path / "more.tsv", (root / "train.tsv").read_text() + "extra1\tan unlogged query\n")
    more = [*good[:5], str(tmp_path / "more.tsv"), *good[6:]]
    exit_2(distillation.main, more, capsys, "have no row in")
    np.save(tmp_path / "d16.npy", vec[:, :16])
    idx = ["--doc_index", str(tmp_path / "d16.npy"), "--doc_ids", str(root / "train.ids"), "--teacher_symmetric"]
    exit_2(distillation.main, [*good, *idx, "--score_corpus", str(stand["beir"])], capsys, "holds 16-d vectors")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    # evaluation: a log of another dimension than the index, a missing query id, a teacher model beside vectors
    write(tmp_path / "few.ids", "".join(f"{i}\n" for i in sorted(MANY_QUERIES)[:-1]))
    np.save(tmp_path / "few.npy", np.load(root / "eval.npy")[:-1])
    ev = [
        "--datasets",
        str(stand["beir"]),
        "--doc_index",
        str(root / "export" / "beir"),
        "--output_path",
        str(tmp_path / "e"),
    ]
    few = [
        *ev,
        "--teacher_query_embeddings",
        str(tmp_path / "few.npy"),
        "--teacher_query_ids",
        str(tmp_path / "few.ids"),
    ]
    exit_2(er.main, few, capsys, "have no row in")
    np.save(tmp_path / "e16.npy", search.unit(np.load(root / "eval.npy")[:, :16]))  # as an API's d=16 vectors
    ids = str(root / "eval.ids")
    exit_2(
        er.main,
        [*ev, "--teacher_query_embeddings", str(tmp_path / "e16.npy"), "--teacher_query_ids", ids],
        capsys,
        "pass --truncate_dim 16",
    )
    with pytest.raises(SystemExit):
        er.main(
            [
                *ev,
                "--teacher_model",
                stand["teacher"],
                "--teacher_query_embeddings",
                str(root / "eval.npy"),
                "--teacher_query_ids",
                ids,
            ]
        )


def test_served_as_the_rest(stand, tmp_path):
    """A projected student and a static student of a vectors-only teacher export (projection inside the graph; the
    static one folded into its table), evaluate from the export against the logged vectors, and are timed against a
    teacher latency given as a number, labelled so."""
    import evaluate_speed
    import serving
    from qdistill import lean

    runs = {
        "proj": distill_vectors(stand, tmp_path / "out", "--run_name", "proj"),
        "static": distill_vectors(
            stand,
            tmp_path / "out",
            "--run_name",
            "static",
            "--student_model_init",
            "static",
            "--learning_rate",
            "0.05",
        ),
    }
    queries = str(stand["root"] / "train.tsv")
    exports = []
    for name, run in runs.items():
        written = serving.main(
            ["--model", run["final_path"], "--queries", queries, "--output_path", str(tmp_path / name), "--no_int8"]
        )
        variant = next(iter(written))
        assert written[variant]["cosine_to_torch"] >= 0.9999 and written[variant]["dim"] == 32
        exports.append(str(tmp_path / name / variant))
    assert Path(exports[1]).name == "static" and lean.LeanEncoder(exports[1]).table.shape[1] == 32
    out = vectors_eval(stand, tmp_path / "eval", models=[runs["proj"]["final_path"], *exports])
    rows = {r["model"]: r for r in out["rows"]}
    assert rows[exports[0]]["metrics"]["NDCG@10"] == pytest.approx(
        rows[runs["proj"]["final_path"]]["metrics"]["NDCG@10"], abs=1e-3
    )
    speed = evaluate_speed.main(
        ["--models", runs["proj"]["final_path"], *exports, "--queries", queries, "--teacher_latency_ms", "250"]
        + [
            "--batch_sizes",
            "1",
            "--repeats",
            "2",
            "--warmup",
            "2",
            "--num_queries",
            "10",
            "--output_path",
            str(tmp_path),
        ]
    )
    given = [r for r in speed["results"] if "speedup_vs_given_teacher" in r]
    assert len(given) == 3 and all(r["speedup_vs_given_teacher"]["source"] == "given by the user" for r in given)
    assert all("speedup" not in r for r in speed["results"])  # nothing measured as the teacher here
    assert any("given by the user (not measured here)" in n for n in speed["notes"])


def test_the_projection_starts_at_the_least_squares_map(stand):
    """Labels that are an exact linear map of the student's features (texts of mixed lengths, so any reordering
    shows) are fitted exactly: the projected student then reproduces them."""
    from qdistill import students
    from qdistill.vector_teacher import VectorTeacher

    base = SentenceTransformer(stand["student"], device="cpu")
    texts = [("word " * (1 + i % 13)) + f"text {i}" for i in range(300)]
    feats = base.encode(texts, convert_to_numpy=True)  # the 16-d student's own (normalised) outputs
    rng = np.random.default_rng(0)
    labels = feats @ rng.normal(size=(16, 32)) + rng.normal(size=32)
    student = students.project(base, VectorTeacher("t", 32, "dot"), 32, "cpu", "s")
    assert students.fit_projection(student, texts, labels) > 0.9999
    assert np.allclose(student.encode(texts, convert_to_numpy=True), labels, atol=1e-3)
