"""evaluate_retrieval.py: main([...]) on tiny and real data: metrics, the index cache, results made alike,
in-domain by content, label-free evaluation, bad input."""

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUILDS, DATA, MINILM, MINILM_LOCAL, make_tiny, needs_data
from helpers import (
    DOCS,
    MANY_QRELS,
    MANY_QUERIES,
    MORE_DOCS,
    QRELS,
    QUERIES,
    distill_argv,
    evaluate,
    exit_2,
    make_beir,
    make_dot_teacher,
    queries_file,
    renamed,
    run_evaluation,
    write,
)
from sentence_transformers import SentenceTransformer

import distillation
import evaluate_retrieval as er
import serving
from qdistill import (
    cli,
    data,
    encoders,
    evaluation,
    given_index,
    in_domain,
    metrics,
    run_files,
    search,
    stats,
    teacher_outputs,
    training_text,
)
from qdistill.cli import UsageError


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


def bad_case(tmp_path, capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        cli.cli(er.main, [*argv, "--output_path", str(tmp_path / "out"), "--log_level", "error"])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and match in err[0], err
    assert not list((tmp_path / "out").glob("retrieval/**/*.json")), "nothing half-written"


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


def test_a_student_with_noisy_encoder_weights_is_evaluated_again(tmp_path):
    from safetensors.torch import load_file, save_file

    ds = make_beir(tmp_path / "tiny", DOCS, QUERIES, QRELS)
    tiny_bert = make_tiny(tmp_path / "t", "bert", hidden=64, seed=0)
    student = Path(make_tiny(tmp_path / "s", "bert", hidden=64, seed=1))  # embeddings alone: 7.8 MB
    weights = next(student.rglob("model.safetensors"))
    assert weights.stat().st_size > 4 << 20
    first = evaluate(tiny_bert, [student], [ds], tmp_path / "out")[(str(student), "tiny")]
    tensors = load_file(weights)
    for name in tensors:  # noise on every encoder tensor; embeddings and pooler untouched, same file size
        if ".encoder." in f".{name}":
            tensors[name] = tensors[name] + torch.randn_like(tensors[name])
    save_file(tensors, weights, metadata={"format": "pt"})
    again = evaluate(tiny_bert, [student], [ds], tmp_path / "out")[(str(student), "tiny")]
    assert not again["reused"] and again["result_key"] != first["result_key"]


def test_evaluation_queries_among_the_training_texts_are_counted_and_left_out(tiny_bert, tmp_path):
    a = make_beir(tmp_path / "a", DOCS, QUERIES, QRELS)
    qfile = write(
        tmp_path / "leak.tsv",
        queries_file(tmp_path) and (tmp_path / "q.tsv").read_text() + "leak\t  Purring   SMALL mammal \n",
    )
    run = distillation.main(
        distill_argv(tiny_bert, tmp_path / "out", qfile, "--num_dev_queries", "1", "--run_name", "leak")
    )["runs"][0]
    rows = evaluate(tiny_bert, [run["final_path"]], [a], tmp_path / "out")
    row, teacher = rows[(run["final_path"], "a")], rows[(tiny_bert, "a")]
    # unless the held-out dev slice took it, the student trained on one of a's two queries
    trained = data.text_hashes(["purring small mammal"])[0] in run_files.text_sources(run["final_path"])["text_hashes"]
    assert trained and row["leaked_queries"] == 1 and row["leaked_query_ids"] == ["q1"]
    # one leaked query no longer flips the collection to in-domain: it is left out of the retention instead
    assert not row["in_domain_text"] and row["training_text"] == "zero-shot"
    clean = row["per_query"]["NDCG@10"]["q2"] / teacher["per_query"]["NDCG@10"]["q2"]
    assert row["retention_ndcg@10"] == pytest.approx(clean)
    assert row["retention"]["NDCG@10"]["queries"] == 1


def test_approximate_results_are_keyed_by_index_seed_and_not_by_the_bootstrap_seed(tiny_bert, tmp_path):
    ds = make_beir(tmp_path / "tiny", MORE_DOCS, QUERIES, QRELS)
    first = evaluate(tiny_bert, [], [ds], tmp_path / "out", "--index", "hnsw", "--index_seed", "1")
    second = evaluate(tiny_bert, [], [ds], tmp_path / "out", "--index", "hnsw", "--index_seed", "2")
    assert not first[(tiny_bert, "tiny")]["reused"] and not second[(tiny_bert, "tiny")]["reused"]
    again = evaluate(tiny_bert, [], [ds], tmp_path / "out", "--index", "hnsw", "--index_seed", "2", "--seed", "7")
    assert again[(tiny_bert, "tiny")]["reused"], "a bootstrap seed changes no index and no search"
    assert (
        tmp_path / "out" / "retrieval" / run_files.slug(tiny_bert) / run_files.slug(tiny_bert) / "tiny.hnsw.json"
    ).exists()


def test_small_corpus_ivfpq_and_existing_file_as_export_folder_exit_2(tiny_bert, tmp_path, capsys):
    ds = make_beir(tmp_path / "tiny", DOCS, QUERIES, QRELS)
    argv = ["--teacher_model", tiny_bert, "--datasets", str(ds), "--index", "ivfpq", "--output_path", str(tmp_path)]
    exit_2(er.main, argv, capsys, f"needs at least {search.IVFPQ_MIN_DOCS} documents")
    assert not (tmp_path / "index").exists(), "refused before the teacher index is built"
    (tmp_path / "file").write_text("x")
    exit_2(
        serving.main,
        ["--model", tiny_bert, "--queries", str(ds), "--output_path", str(tmp_path / "file")],
        capsys,
        "is a file",
    )


def test_a_dot_product_teacher_is_searched_by_dot_product(tmp_path):
    teacher = make_dot_teacher(tmp_path / "t")
    ds = make_beir(tmp_path / "tiny", MORE_DOCS, QUERIES, QRELS)
    row = evaluate(teacher, [], [ds], tmp_path / "out")[(teacher, "tiny")]
    model = SentenceTransformer(teacher, device="cpu")
    corpus, queries, qrels, _ = data.load_beir(ds)
    ids = sorted(corpus)
    docs = model.encode_document([teacher_outputs.doc_text(corpus[i]) for i in ids])
    assert np.linalg.norm(docs, axis=1).std() > 1e-3, "unnormalised: cosine and dot rank differently"
    results = {}
    for qid in sorted(queries):
        scores = docs @ model.encode_query([queries[qid]])[0]
        results[qid] = {ids[j]: float(scores[j]) for j in np.argsort(-scores)[:101]}
    by_hand, _ = metrics.evaluate(qrels, results, [1, 3, 5, 10, 100])
    assert row["similarity"] == "dot" and row["metrics"]["NDCG@10"] == pytest.approx(by_hand["NDCG@10"], abs=1e-6)


def test_cqadupstack_is_the_mean_of_its_forums_and_msmarco_uses_dev(tiny_bert, tmp_path):
    root = tmp_path / "cqadupstack"
    for i, forum in enumerate(data.CQADUPSTACK_FORUMS):  # forum i quotes document i % 4; another may be judged
        make_beir(root / forum, DOCS, {"q": list(DOCS.values())[i % 4][1]}, {"q": {f"d{1 + (i + i // 4) % 4}": 1}})
    rows = evaluate(tiny_bert, [], [root], tmp_path / "out")
    saved = tmp_path / "out" / "retrieval" / run_files.slug(tiny_bert) / run_files.slug(tiny_bert)
    forums = [
        json.loads((saved / f"cqadupstack-{f}.json").read_text())["metrics"]["NDCG@10"]
        for f in data.CQADUPSTACK_FORUMS
    ]
    assert len(set(forums)) > 1, "forums differ, so the mean is a real check"
    assert rows[(tiny_bert, "cqadupstack")]["metrics"]["NDCG@10"] == pytest.approx(np.mean(forums))
    msmarco = make_beir(tmp_path / "msmarco", DOCS, QUERIES, QRELS, split="dev")
    row = evaluate(tiny_bert, [], [msmarco], tmp_path / "out")[(tiny_bert, "msmarco")]
    assert row["split"] == "dev" and row["num_queries"] == 2


def test_result_files_keep_per_query_values_equal_to_the_averages(tmp_path):
    teacher = make_tiny(tmp_path / "t", "bert", seed=0)
    student = make_tiny(tmp_path / "s", "bert", seed=1)
    ds = make_beir(tmp_path / "tiny", MORE_DOCS, MANY_QUERIES, MANY_QRELS)
    out = run_evaluation(teacher, [student], [ds], tmp_path / "out")
    for row in out["rows"]:
        for m in ("NDCG@10", "Recall@100", "MRR@10", "NDCG@1"):
            assert np.mean(list(row["per_query"][m].values())) == pytest.approx(row["metrics"][m], abs=1e-4), m
    student_row = next(r for r in out["rows"] if r["model"] == student)
    assert 0 < student_row["retention"]["NDCG@10"]["p_value"] <= 1
    assert f"({stats.fmt_ci(student_row['retention']['NDCG@10'], 2)})" in out["table"]


def test_agreement_is_perfect_for_the_teacher_itself_and_lower_for_a_student(tmp_path):
    teacher = make_tiny(tmp_path / "t", "bert", seed=0)
    same = tmp_path / "same"
    shutil.copytree(teacher, same)
    student = make_tiny(tmp_path / "s", "bert", seed=1)
    ds = make_beir(tmp_path / "tiny", MORE_DOCS, MANY_QUERIES, MANY_QRELS)
    rows = {r["model"]: r for r in run_evaluation(teacher, [same, student], [ds], tmp_path / "out")["rows"]}
    for m in metrics.AGREEMENT:
        assert rows[str(same)]["agreement"][m]["value"] == pytest.approx(1.0, abs=1e-5)
    assert rows[student]["agreement"]["overlap@10"]["value"] < 0.9
    low, high = (rows[student]["agreement"]["overlap@10"][k] for k in ("low", "high"))
    assert low <= rows[student]["agreement"]["overlap@10"]["value"] <= high


def test_label_free_collection_with_a_query_log_and_with_pseudo_queries(tmp_path, capsys):
    teacher = make_tiny(tmp_path / "t", "bert", seed=0)
    student = make_tiny(tmp_path / "s", "bert", seed=1)
    coll = write(tmp_path / "docs.tsv", "".join(f"{k}\t{v[0]} {v[1]}\n" for k, v in MORE_DOCS.items()))
    log = write(tmp_path / "log.txt", "cats that purr\nrocket engines\nsourdough\nvolcano lava\n")
    out = run_evaluation(teacher, [student], [coll], tmp_path / "out", "--queries", log)
    row = next(r for r in out["rows"] if r["model"] == student)
    assert row["dataset"] == "docs-label-free" and "metrics" not in row and row["num_queries"] == 4
    assert set(row["agreement"]) == set(metrics.AGREEMENT) and "overlap@10" in out["table"]
    folder = make_beir(tmp_path / "c", MORE_DOCS, QUERIES, QRELS)
    pseudo = run_evaluation(teacher, [student], [folder], tmp_path / "out", "--label_free", "--pseudo_queries", "15")
    row = next(r for r in pseudo["rows"] if r["model"] == student)
    assert row["dataset"] == "c-pseudo15" and row["num_queries"] == 15
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / "corpus.jsonl", bare / "corpus.jsonl")
    exit_2(
        er.main,
        ["--teacher_model", teacher, "--datasets", str(bare), "--label_free", "--output_path", str(tmp_path / "out")],
        capsys,
        "--pseudo_queries N",
    )


def test_pseudo_queries_depend_on_the_collection_n_and_seed_only_and_trained_ones_are_left_out(tiny_bert, tmp_path):
    folder = make_beir(tmp_path / "c", MORE_DOCS, QUERIES, QRELS)
    corpus, _ = data.load_corpus(folder)
    spans = training_text.sample_spans(corpus, 15, list(range(3, 13)), 0 + 5)  # what --pseudo_queries 15 draws
    lines = [f"{i}\tquery number {i}\n" for i in range(60)] + [f"s{i}\t{s}\n" for i, s in enumerate(spans[:8])]
    qfile = write(tmp_path / "q.tsv", "".join(lines))
    run = distillation.main(
        distill_argv(tiny_bert, tmp_path / "out", qfile, "--num_dev_queries", "1", "--run_name", "r")
    )["runs"][0]
    trained = set(run_files.text_sources(run["final_path"])["text_hashes"])
    leaked = len(trained & set(data.text_hashes(spans)))
    assert leaked >= 7, "the student trained on the first spans"
    argv = ["--label_free", "--pseudo_queries", "15"]
    alone = run_evaluation(tiny_bert, [], [folder], tmp_path / "e1", *argv)
    out = run_evaluation(tiny_bert, [run["final_path"]], [folder], tmp_path / "e", *argv)
    row = next(r for r in out["rows"] if r["model"] == run["final_path"])
    teacher_alone = next(r for r in alone["rows"] if r["model"] == tiny_bert)
    teacher = next(r for r in out["rows"] if r["model"] == tiny_bert)
    # adding a student changes nothing about the query set: (collection, N, seed) alone decide it (was: filtered)
    assert teacher_alone["result_key"] == teacher["result_key"] and teacher["num_queries"] == 15
    assert row["num_queries"] == 15 and row["leaked_queries"] == leaked
    assert row["agreement"]["overlap@10"]["n"] == 15 - leaked, "trained pseudo-queries are left out of agreement"
    assert f"{15 - leaked} ({leaked} trained on, left out)" in out["table"]
    other = run_evaluation(tiny_bert, [], [folder], tmp_path / "e1", *argv[:-1], "5")
    assert {r["dataset"] for r in other["rows"]} == {"c-pseudo5"}, "another N is another result, never overwritten"
    assert (
        tmp_path / "e1" / "retrieval" / run_files.slug(tiny_bert) / run_files.slug(tiny_bert) / "c-pseudo15.json"
    ).exists()


def test_results_name_training_text_and_mark_in_domain(tiny_bert, tmp_path):
    a = make_beir(
        tmp_path / "a",
        {**DOCS, **{f"x{i}": ("", f"filler text number {i} on a topic") for i in range(40)}},
        QUERIES,
        QRELS,
    )
    b = make_beir(tmp_path / "b", DOCS, {"q9": "bread yeast"}, {"q9": {"d3": 1}})
    b_docs = b / "corpus.jsonl"
    b_docs.write_text(b_docs.read_text() + json.dumps({"_id": "e", "title": "", "text": "an extra doc"}) + "\n")
    qfile = queries_file(tmp_path)
    argv = distill_argv(
        tiny_bert,
        tmp_path / "out",
        qfile,
        "--train_queries",
        qfile,
        f"corpus:{a}",
        "--max_train_queries",
        "60",
        "--run_name",
        "docs",
    )
    run = distillation.main(argv)
    student = run["runs"][0]["final_path"]
    sources = json.loads((tmp_path / "out" / "docs" / "final" / "training_text.json").read_text())
    assert [c["spec"] for c in sources["corpora"]] == [f"corpus:{a}"] and sources["corpora"][0]["texts"] > 0
    out = er.main(
        [
            "--teacher_model",
            tiny_bert,
            "--models",
            student,
            "--datasets",
            str(a),
            str(b),
            "--output_path",
            str(tmp_path / "out"),
            "--log_level",
            "error",
        ]
    )
    rows = {r["dataset"]: r for r in out["rows"] if r["model"] == student}
    assert rows["a"]["training_text"] == "in-domain" and rows["b"]["training_text"] == "zero-shot"
    assert rows["a"]["training_text_sources"]["corpora"][0]["spec"] == f"corpus:{a}"
    assert "a nDCG@10" in out["table"] and ")*" in out["table"] and "in-domain ret. nDCG@10" in out["table"]


def test_renamed_document_ids_give_the_same_ndcg_even_where_they_equal_query_ids(pair, tmp_path):
    teacher, student = pair
    a = make_beir(tmp_path / "a", MORE_DOCS, MANY_QUERIES, MANY_QRELS)
    # documents renamed to the query ids (q0, q1, ...): an equal id is not the query's own document
    ids = sorted(MORE_DOCS)
    b = renamed(tmp_path / "b", {d: f"q{i}" if i < 24 else f"z{i}" for i, d in enumerate(ids)})
    first = evaluate(teacher, [student], [a], tmp_path / "out")
    second = evaluate(teacher, [student], [b], tmp_path / "out")
    for model in (teacher, student):
        x, y = first[(model, "a")], second[(model, "b")]
        assert y["metrics"]["NDCG@10"] == pytest.approx(x["metrics"]["NDCG@10"], abs=1e-9), model
        assert y["identical_ids_dropped"] == 0 and y["own_id_queries"] == 0
    assert second[(student, "b")]["retention_ndcg@10"] == pytest.approx(first[(student, "a")]["retention_ndcg@10"])


def test_a_query_that_is_its_own_document_loses_it_and_a_declared_collection_drops_every_own_id(pair, tmp_path):
    teacher, _ = pair
    docs = {**MORE_DOCS, "q0": ("", MANY_QUERIES["q0"])}  # ArguAna-style: query q0's text is document q0
    folder = make_beir(tmp_path / "c", docs, MANY_QUERIES, MANY_QRELS)
    row = evaluate(teacher, [], [folder], tmp_path / "out")[(teacher, "c")]
    assert row["own_id_queries"] == 1 and row["identical_ids_dropped"] == 1
    declared = evaluate(teacher, [], [folder], tmp_path / "out2", "--self_retrieval")[(teacher, "c")]
    assert declared["own_id_queries"] == 1, "only q0 has a document of its id"


def test_a_label_free_log_keeps_documents_that_share_its_query_ids(pair, tmp_path):
    teacher, student = pair
    coll = write(tmp_path / "docs.tsv", "".join(f"{k}\t{v[0]} {v[1]}\n" for k, v in MORE_DOCS.items()))
    texts = ["cats that purr", "rocket engines", "sourdough", "volcano lava", "filler topic 3"]
    other = write(tmp_path / "a" / "log.tsv", "".join(f"L{i}\t{t}\n" for i, t in enumerate(texts)))
    # the same log whose ids are document ids: before, those documents were dropped from both rankings
    same = write(tmp_path / "b" / "log.tsv", "".join(f"{d}\t{t}\n" for d, t in zip(sorted(MORE_DOCS), texts)))
    x = evaluate(teacher, [student], [coll], tmp_path / "o1", "--queries", other)[(student, "docs-label-free")]
    y = evaluate(teacher, [student], [coll], tmp_path / "o2", "--queries", same)[(student, "docs-label-free")]
    for m in metrics.AGREEMENT:
        assert y["agreement"][m]["value"] == pytest.approx(x["agreement"][m]["value"]), m


def test_overlap_on_a_one_document_corpus_is_one_for_identical_rankings(pair, tmp_path):
    teacher, _ = pair
    coll = write(tmp_path / "one.tsv", "d1\tthe only document\n")
    log = write(tmp_path / "log.tsv", "q1\tonly\nq2\tdocument\n")
    row = evaluate(teacher, [make_tiny(tmp_path / "copy", "bert", seed=0)], [coll], tmp_path / "o", "--queries", log)
    student = next(r for (m, _), r in row.items() if m != teacher)
    assert student["agreement"]["overlap@10"]["value"] == 1.0, "was 0.100: divided by 10 whatever the hits"


def test_a_folder_without_qrels_is_label_free_and_a_missing_split_names_the_flag(pair, tmp_path, capsys):
    teacher, student = pair
    folder = make_beir(tmp_path / "logs", MORE_DOCS, MANY_QUERIES, MANY_QRELS)
    shutil.rmtree(folder / "qrels")
    out = run_evaluation(teacher, [student], [folder], tmp_path / "out")
    row = next(r for r in out["rows"] if r["model"] == student)
    assert row["dataset"] == "logs-label-free" and row["num_queries"] == 24 and "metrics" not in row
    assert "| model | dataset | queries | overlap@10 |" in out["table"] and "nDCG@10 (ret.)" not in out["table"]
    split = make_beir(tmp_path / "dev_only", MORE_DOCS, MANY_QUERIES, MANY_QRELS, split="dev")
    argv = ["--teacher_model", teacher, "--datasets", str(split), "--output_path", str(tmp_path / "o2")]
    exit_2(er.main, argv, capsys, "--label_free")
    labelled = make_beir(tmp_path / "lab", MORE_DOCS, MANY_QUERIES, MANY_QRELS)
    log = write(tmp_path / "log.tsv", "q1\tcats\n")
    exit_2(er.main, [*argv[:3], str(labelled), *argv[4:], "--queries", log], capsys, "add --label_free")
    empty = write(tmp_path / "empty.tsv", "q1\t \n")
    exit_2(er.main, [*argv[:3], str(labelled), *argv[4:], "--label_free", "--queries", empty], capsys, empty)


def test_in_domain_by_content_never_by_where_the_query_file_lies(pair, tmp_path):
    teacher, student = pair
    queries = {f"t{i}": f"training question number {i} on subject {i % 3}" for i in range(40)}
    folder = make_beir(tmp_path / "c", MORE_DOCS, {**MANY_QUERIES, **queries}, MANY_QRELS)
    # unrelated queries stored inside the collection's folder: zero-shot (was in-domain by path)
    inside = write(
        folder / "unrelated.tsv", "".join(f"{i}\tunrelated query {i} about topic {i % 7}\n" for i in range(60))
    )
    # the collection's own (non-evaluated) queries copied elsewhere: in-domain (was zero-shot by path)
    outside = write(tmp_path / "elsewhere" / "q.tsv", "".join(f"{q}\t{t}\n" for q, t in queries.items()))
    runs = {}
    for name, qfile in (("inside", inside), ("outside", outside)):
        argv = distill_argv(teacher, tmp_path / "runs", qfile, "--num_dev_queries", "3", "--run_name", name)
        runs[name] = distillation.main(argv)["runs"][0]["final_path"]
    rows = evaluate(teacher, list(runs.values()), [folder], tmp_path / "out")
    assert rows[(runs["inside"], "c")]["training_text"] == "zero-shot"
    out = rows[(runs["outside"], "c")]
    assert out["training_text"] == "in-domain" and out["in_domain_by"] == "queries"
    assert out["collection_queries_trained"] >= in_domain.MIN_SHARED_QUERIES and out["leaked_queries"] == 0


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--seed", "-1"], "--seed"),
        (["--index_seed", "-3"], "--index_seed"),
        (["--device", "foo"], "--device foo is not a device"),
        (["--device", "mps"], "no MPS"),
    ],
)
def test_bad_evaluation_flags_exit_2_before_any_model_loads(pair, tmp_path, capsys, argv, match):
    folder = make_beir(tmp_path / "c", MORE_DOCS, MANY_QUERIES, MANY_QRELS)
    full = ["--teacher_model", pair[0], "--datasets", str(folder), "--output_path", str(tmp_path / "o"), *argv]
    if argv[0] in ("--seed", "--index_seed"):
        with pytest.raises(SystemExit) as e:
            er.parse_args(full)
        assert e.value.code == 2 and match in capsys.readouterr().err
    else:
        exit_2(er.main, full, capsys, match)
    assert not list((tmp_path / "o").glob("retrieval/**/*.json"))


def test_save_run_on_a_finished_result_writes_the_run_file(pair, tmp_path):
    teacher, _ = pair
    folder = make_beir(tmp_path / "c", MORE_DOCS, MANY_QUERIES, MANY_QRELS)
    run_evaluation(teacher, [], [folder], tmp_path / "out")
    run_evaluation(teacher, [], [folder], tmp_path / "out", "--save_run")
    trec = tmp_path / "out" / "retrieval" / run_files.slug(teacher) / run_files.slug(teacher) / "c.trec"
    assert trec.is_file() and len(trec.read_text().splitlines()) == 24 * len(MORE_DOCS)


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
