"""evaluate_retrieval.py: metrics by hand, faiss vs beir, the cached teacher index, bad input, real SciFact."""

import json
import math
import random
from pathlib import Path

import pytest
from conftest import BUILDS, DATA, MINILM, MINILM_LOCAL, needs_data

import evaluate_retrieval as er
from qdistill import cli, data, evaluation, given_index, metrics, run_files, teacher_outputs


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


DOCS = {
    "d1": ("Cats", "The domestic cat is a small carnivorous mammal that purrs."),
    "d2": ("Rockets", "A rocket engine uses stored propellant to produce thrust in space."),
    "d3": ("Bread", "Sourdough bread is leavened by wild yeast and lactic acid bacteria."),
    "d4": ("Volcanoes", "A volcano is a rupture in the crust through which lava erupts."),
}


@pytest.fixture
def tiny_beir(tmp_path):
    # each query repeats one document exactly, so that document must rank first
    queries = {
        "q1": "Cats The domestic cat is a small carnivorous mammal that purrs.",
        "q2": "Rockets A rocket engine uses stored propellant to produce thrust in space.",
    }
    return make_beir(tmp_path / "tiny", DOCS, queries, {"q1": {"d1": 2}, "q2": {"d2": 1}})


def run(args, out):
    return er.main([*args, "--output_path", str(out), "--log_level", "warning"])


def test_metrics_by_hand():
    qrels = {"q1": {"d1": 2, "d3": 1}, "q2": {"d2": 1}}
    results = {"q1": {"d3": 0.9, "d1": 0.8, "d2": 0.1}, "q2": {"d1": 0.5, "d2": 0.4, "d3": 0.3}}
    m, dropped = metrics.evaluate(qrels, results, [1, 3])
    assert dropped == 0
    # pytrec_eval (trec_eval) uses the graded label itself as gain: q1 has gains (1, 2, 0) at ranks 1..3
    dcg1 = 1 / math.log2(2) + 2 / math.log2(3)
    idcg1 = 2 / math.log2(2) + 1 / math.log2(3)
    dcg2, idcg2 = 1 / math.log2(3), 1.0
    assert m["NDCG@3"] == pytest.approx((dcg1 / idcg1 + dcg2 / idcg2) / 2, abs=1e-4)
    assert m["NDCG@1"] == pytest.approx((1 / 2 + 0) / 2, abs=1e-4)
    assert m["Recall@1"] == pytest.approx((1 / 2 + 0) / 2, abs=1e-4)
    assert m["P@3"] == pytest.approx((2 / 3 + 1 / 3) / 2, abs=1e-3)
    assert m["MRR@10"] == pytest.approx((1 + 1 / 2) / 2, abs=1e-4)
    assert results["q1"] == {"d3": 0.9, "d1": 0.8, "d2": 0.1}, "evaluate must not mutate its input"


def test_identical_ids_are_ignored_unless_judged_relevant_and_before_every_metric():
    m, dropped = metrics.evaluate({"x": {"d1": 1}}, {"x": {"x": 0.99, "d1": 0.5}}, [1], own={"x"})
    assert m["NDCG@1"] == 1.0 and dropped == 1
    assert m["MRR@10"] == 1.0, "MRR@10 is computed after the query's own id is dropped too (was 0.5)"
    m, dropped = metrics.evaluate({"x": {"d1": 1}}, {"x": {"x": 0.99, "d1": 0.5}}, [1])
    assert m["NDCG@1"] == 0.0 and dropped == 0, "an equal id alone is a coincidence: the document stays"
    # Cranfield's query 225 has document 225 judged relevant: that hit counts (beir's flag dropped it)
    m, dropped = metrics.evaluate(
        {"225": {"225": 2, "7": 1}}, {"225": {"225": 0.9, "7": 0.5, "8": 0.1}}, [1, 3], {"225"}
    )
    assert dropped == 0 and m["NDCG@1"] == 1.0 and m["Recall@3"] == 1.0 and m["MRR@10"] == 1.0


@pytest.mark.slow
def test_tiny_end_to_end_and_index_cache(tiny_beir, tmp_path):
    builds = BUILDS["index"]
    out = run(["--teacher_model", MINILM, "--datasets", str(tiny_beir), "--save_run"], tmp_path)
    row = out["rows"][0]
    assert row["metrics"]["NDCG@10"] == 1.0 and row["metrics"]["MRR@10"] == 1.0
    assert row["num_docs"] == 4 and row["similarity"] == "cosine"
    trec = (
        (tmp_path / "retrieval" / run_files.slug(MINILM) / run_files.slug(MINILM) / "tiny.trec")
        .read_text()
        .split("\n")
    )
    assert len([x for x in trec if x]) == 8, "k=100 > 4 docs: faiss -1 padding must be dropped"
    assert BUILDS["index"] == builds + 1
    run(["--teacher_model", MINILM, "--models", MINILM_LOCAL, "--datasets", str(tiny_beir)], tmp_path)
    assert BUILDS["index"] == builds + 1, "a second student must reuse the index"
    run(["--teacher_model", MINILM, "--datasets", str(tiny_beir), "--corpus_max_seq_length", "16"], tmp_path)
    assert BUILDS["index"] == builds + 2, "a changed max length must rebuild the index"


def bad_case(tmp_path, capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        cli.cli(er.main, [*argv, "--output_path", str(tmp_path / "out"), "--log_level", "error"])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and match in err[0], err
    assert not list((tmp_path / "out").glob("retrieval/**/*.json")), "nothing half-written"


def test_bad_datasets(tmp_path, capsys, tiny_beir):
    missing = tmp_path / "nocorpus"
    make_beir(missing, DOCS, {"q1": "x"}, {"q1": {"d1": 1}})
    (missing / "corpus.jsonl").unlink()
    bad_case(tmp_path, capsys, ["--teacher_model", MINILM, "--datasets", str(missing)], "corpus.jsonl not found")
    broken = make_beir(tmp_path / "broken", DOCS, {"q1": "x"}, {"q1": {"d1": 1}})
    with open(broken / "queries.jsonl", "a") as f:
        f.write('{"_id": "q2", "text": \n')
    bad_case(tmp_path, capsys, ["--teacher_model", MINILM, "--datasets", str(broken)], "queries.jsonl:2")
    empty = make_beir(tmp_path / "empty", DOCS, {"q1": "x"}, {"qX": {"d1": 1}})
    bad_case(tmp_path, capsys, ["--teacher_model", MINILM, "--datasets", str(empty)], "no judged queries")
    bad_case(tmp_path, capsys, ["--teacher_model", MINILM, "--datasets", str(tmp_path / "nope")], "not found")
    # a name that is neither local nor on the BEIR server (or no network at all): the download fails cleanly
    argv = ["--teacher_model", MINILM, "--datasets", "no-such-beir-dataset", "--data_dir", str(tmp_path / "dl")]
    bad_case(tmp_path, capsys, argv, "download failed")
    assert not list((tmp_path / "dl").glob("*.zip")), "no partial download left behind"


def test_unknown_qrels_are_dropped_and_counted(tmp_path):
    folder = make_beir(tmp_path / "u", DOCS, {"q1": "cat"}, {"q1": {"d1": 1, "dX": 1}, "qZ": {"d2": 1}})
    corpus, queries, qrels, stats = data.load_beir(folder)
    assert qrels == {"q1": {"d1": 1}} and list(queries) == ["q1"]
    assert stats == {"unknown_qrels_queries": 1, "unknown_qrels_docs": 1, "queries_without_positive": 0}


def test_queries_with_no_positive_judgment_are_left_out_and_counted(tmp_path):
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 0, "d3": -1}}
    folder = make_beir(tmp_path / "p", DOCS, {"q1": "cat", "q2": "rocket"}, qrels)
    _, queries, kept, stats = data.load_beir(folder)
    assert list(queries) == ["q1"] and kept == {"q1": {"d1": 1}} and stats["queries_without_positive"] == 1


def test_qrels_that_are_not_utf8_are_one_line(tmp_path):
    folder = make_beir(tmp_path / "b", DOCS, {"q1": "cat"}, {"q1": {"d1": 1}})
    (folder / "qrels" / "test.tsv").write_bytes(b"query-id\tcorpus-id\tscore\nq1\td\xe91\t1\n")
    with pytest.raises(data.UsageError, match="not UTF-8"):
        data.load_beir(folder)


@pytest.mark.slow
def test_dimension_mismatch(tmp_path, capsys, tiny_beir, tiny_bert):
    argv = ["--teacher_model", MINILM, "--models", tiny_bert, "--datasets", str(tiny_beir)]
    with pytest.raises(SystemExit) as e:
        cli.cli(er.main, [*argv, "--output_path", str(tmp_path / "out"), "--log_level", "error"])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "32-d embeddings but the teacher index is 384-d" in err[0]


# ----------------------------------------------------------------------------- real SciFact


@pytest.mark.slow
@needs_data
def test_scifact_teacher_as_student(scifact_eval):
    first, _, built, _ = scifact_eval
    rows = {r["model"]: r for r in first["rows"]}
    teacher, same = rows[MINILM], rows[MINILM_LOCAL]
    assert same["metrics"] == teacher["metrics"] and same["retention_ndcg@10"] == 1.0
    # MTEB reports ~0.645 nDCG@10 for all-MiniLM-L6-v2 on SciFact
    assert 0.62 <= teacher["metrics"]["NDCG@10"] <= 0.67, teacher["metrics"]["NDCG@10"]
    assert teacher["num_queries"] == 300 and teacher["num_docs"] == 5183
    assert "(teacher)" in first["table"]


@pytest.mark.slow
@needs_data
def test_scifact_student_reuses_index(scifact_eval, minilm_student):
    _, second, built, rebuilt = scifact_eval
    assert rebuilt == 0, "the second evaluation must not re-encode the corpus"
    student = next(r for r in second["rows"] if r["model"] == minilm_student["final_path"])
    assert 0.3 < student["retention_ndcg@10"] < 1.0
    teacher = next(r for r in second["rows"] if r["model"] == MINILM)
    assert teacher["config"]["args"]["models"] == [MINILM_LOCAL], "the teacher row came from the first run's file"


@pytest.mark.slow
@needs_data
def test_faiss_matches_beir_exact_search(scifact_eval, minilm_student, shared_output, tmp_path):
    """Same student/teacher pair: faiss flat top-10 == beir DenseRetrievalExactSearch top-10."""
    import numpy as np
    from beir.retrieval.search.dense import DenseRetrievalExactSearch
    from sentence_transformers import SentenceTransformer

    corpus, queries, qrels, _ = data.load_beir(DATA / "scifact")
    rng = random.Random(0)
    keep = sorted({d for r in qrels.values() for d in r} | set(rng.sample(sorted(corpus), 400)))
    qids = sorted(queries)[:60]
    sub = make_beir(
        tmp_path / "scifact-sub",
        {d: (corpus[d]["title"], corpus[d]["text"]) for d in keep},
        {q: queries[q] for q in qids},
        {q: qrels[q] for q in qids},
    )
    teacher = SentenceTransformer(MINILM_LOCAL, device="cpu")
    student = SentenceTransformer(minilm_student["final_path"], device="cpu")

    class Pair:  # beir's model interface: queries by the student, documents by the teacher
        def encode_queries(self, qs, batch_size=32, **kw):
            return student.encode_query(qs, batch_size=batch_size, convert_to_tensor=True)

        def encode_corpus(self, docs, batch_size=32, **kw):
            texts = [(d.get("title", "") + " " + d["text"]).strip() for d in docs]
            return teacher.encode_document(texts, batch_size=batch_size, convert_to_tensor=True)

    sub_corpus, sub_queries, _, _ = data.load_beir(sub)
    dres = DenseRetrievalExactSearch(Pair(), batch_size=64, corpus_chunk_size=10_000)
    beir_res = dres.search(sub_corpus, sub_queries, top_k=10, score_function="cos_sim")

    _, ids, meta = teacher_outputs.teacher_index(
        teacher, "teacher-sub", MINILM_LOCAL, sub_corpus, sub / "corpus.jsonl", shared_output
    )
    q_ids = sorted(sub_queries)
    q = student.encode_query([sub_queries[x] for x in q_ids])
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    # the production search: the cached index opened as any given .npy, exact search chunk by chunk
    searcher, _ = evaluation.searchers(
        given_index.open_npy(Path(meta["folder"]) / "embeddings.npy", ids), "flat", None, 0, True
    )
    scores, rows = searcher(q, 10)
    ours = evaluation.to_results(q_ids, ids, scores, rows)
    same = [set(ours[x]) == set(beir_res[x]) for x in q_ids]
    assert sum(same) == len(q_ids), f"{len(q_ids) - sum(same)} queries differ"
    for x in q_ids:
        for d, s in ours[x].items():
            assert s == pytest.approx(beir_res[x][d], abs=1e-4)


@pytest.mark.slow
@needs_data
def test_approximate_indexes_report_recall_and_are_built_once(scifact_eval, shared_output):

    for kind, floor in (("hnsw", 0.9), ("ivfpq", 0.3)):
        builds = BUILDS["approximate"]
        argv = ["--teacher_model", MINILM, "--datasets", str(DATA / "scifact"), "--index", kind]
        row = run(argv, shared_output)["rows"][0]
        assert row["index"] == kind and floor <= row["approx_recall"]["@10"] <= 1.0, row["approx_recall"]
        assert BUILDS["approximate"] == builds + 1
        again = run([*argv, "--overwrite"], shared_output)["rows"][0]  # re-evaluated, from the written index
        assert BUILDS["approximate"] == builds + 1, "the second evaluation reads the written index"
        assert again["metrics"] == row["metrics"] and again["approx_recall"] == row["approx_recall"]
