"""Every number earned (fast tier, tiny models): results paired only when made alike, own ids dropped only where
the query is the document, in-domain by content, collections without qrels, hostile flags.

Each test fails on the code before the fix it names (issue "Every number earned").
"""

import json
import shutil

import pytest
from conftest import make_tiny
from test_defects import distill_argv, exit_2, write
from test_fidelity import MANY_QRELS, MANY_QUERIES, MORE_DOCS
from test_retrieval import make_beir
from test_trust import evaluate, run_evaluation

import distillation
import evaluate_retrieval as er
import report
from qdistill import cli, in_domain, metrics, onnx_export, run_files


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(teacher, student): two tiny random models of one dimension."""
    root = tmp_path_factory.mktemp("pair")
    return make_tiny(root / "t", "bert", seed=0), make_tiny(root / "s", "bert", seed=1)


def renamed(folder, mapping):
    """A copy of a BEIR folder with its document ids renamed (qrels too)."""
    docs = {mapping[d]: v for d, v in MORE_DOCS.items()}
    qrels = {q: {mapping[d]: s for d, s in r.items()} for q, r in MANY_QRELS.items()}
    return make_beir(folder, docs, MANY_QUERIES, qrels)


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


def test_report_refuses_a_student_result_made_under_other_qrels(pair, tmp_path, capsys):
    teacher, student = pair
    a = make_beir(tmp_path / "a", MORE_DOCS, MANY_QUERIES, MANY_QRELS)
    run_evaluation(teacher, [student], [a], tmp_path / "out")
    speed = write(tmp_path / "speed.json", json.dumps({"results": []}))
    argv = ["example", "--teacher_model", teacher, "--student", student, "--datasets", str(a)]
    argv += ["--speed", speed, "--output_path", str(tmp_path / "out")]
    assert "mean retention, zero-shot" in report.main(argv)
    # the qrels edited, the teacher alone re-scored: the student's old file must not be divided by it
    edited = {q: {"d1": 1} for q in MANY_QRELS}
    make_beir(a, MORE_DOCS, MANY_QUERIES, edited)
    run_evaluation(teacher, [], [a], tmp_path / "out")
    exit_2(report.main, argv, capsys, "corpus, queries or qrels")
    # hnsw results live in their own files: a flat student is never paired with an hnsw teacher
    run_evaluation(teacher, [], [a], tmp_path / "out", "--index", "hnsw")
    exit_2(report.main, [*argv, "--index", "hnsw"], capsys, "missing")


def test_report_names_bad_speed_files_and_label_free_datasets(pair, tmp_path, capsys):
    teacher, student = pair
    coll = write(tmp_path / "coll.tsv", "".join(f"{k}\t{v[1]}\n" for k, v in MORE_DOCS.items()))
    log = write(tmp_path / "log.tsv", "q1\tcats\nq2\trockets\n")
    run_evaluation(teacher, [student], [coll], tmp_path / "out", "--queries", log)
    bad = write(tmp_path / "speed.json", "not json")
    base = ["example", "--teacher_model", teacher, "--student", student, "--output_path", str(tmp_path / "out")]
    exit_2(report.main, [*base, "--datasets", coll, "--speed", bad], capsys, "not an evaluate_speed.py result")
    good = write(tmp_path / "speed2.json", json.dumps({"results": []}))
    exit_2(report.main, [*base, "--datasets", coll, "--speed", good], capsys, "evaluated label-free")


def test_spearman_p_is_exact_for_three_pairs():
    assert report.spearman([1, 2, 3], [1, 2, 3], 0) == "rho = 1.000 (p = 0.33, permutation)"


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


# ----------------------------------------------------------------------------- distillation: flags and keys


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


def test_recipe_keys_count_what_makes_the_student_and_nothing_else(pair, tmp_path):
    from qdistill import recipes

    q = write(tmp_path / "q.tsv", "".join(f"{i}\tquery number {i} about topic {i % 7}\n" for i in range(80)))
    argv = distill_argv(pair[0], tmp_path / "out", q, "--run_name", "r", "--skip_finished", "--layers", "0", "3")
    first = distillation.main(argv)["runs"][0]
    # the order of --layers, the logging interval and the checkpoints kept make the same student: kept
    same = [*argv[:-4], "--skip_finished", "--layers", "3", "0", "--logging_steps", "7", "--save_total_limit", "1"]
    assert distillation.main(same)["runs"][0].get("reused")
    args = distillation.parse_args(argv)
    one = recipes.fingerprint(args, {}, tmp_path, "layer_reduction", 1)
    assert recipes.fingerprint(args, {}, tmp_path, "layer_reduction", 4) != one, "4 GPUs: 4x the batch per step"
    # a damaged metrics.json or a final/ without its weights is not a finished run: trained again
    (tmp_path / "out" / "r" / "final" / "model.safetensors").unlink()
    with pytest.raises(cli.UsageError, match="no finished run of this recipe"):  # was: kept without weights
        distillation.main(argv)
    assert not distillation.main([*argv, "--overwrite_output_dir"])["runs"][0].get("reused")
    (tmp_path / "out" / "r" / "metrics.json").write_text("{broken")
    again = distillation.main([*argv, "--overwrite_output_dir"])["runs"][0]
    assert not again.get("reused") and again["dev_mse"] == pytest.approx(first["dev_mse"], rel=1e-4)


def test_push_to_hub_without_the_hub_fails_before_training(pair, tmp_path, capsys):
    q = write(tmp_path / "q.tsv", "".join(f"{i}\tquery {i}\n" for i in range(40)))
    argv = distill_argv(pair[0], tmp_path / "out", q, "--push_to_hub", "--hub_model_id", "me/s", "--run_name", "r")
    exit_2(distillation.main, argv, capsys, "--push_to_hub me/s")
    assert not (tmp_path / "out" / "r").exists() and not (tmp_path / "out" / "labels").exists()


def test_repairing_a_damaged_fp32_export_keeps_the_int8_one(pair, tmp_path):
    from pathlib import Path

    texts = ["a query about cats", "rocket engines", "bread"]
    first = onnx_export.cached_export("tiny", Path(pair[1]), tmp_path, texts, int8=True, num_threads=1)
    folder = first["fp32"].folder
    (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes()[:1000])
    onnx_export.cached_export("tiny", Path(pair[1]), tmp_path, texts, int8=False, num_threads=1)  # fp32 only wanted
    assert onnx_export.is_export(folder.parent / "int8"), "was: the intact int8 export was deleted as a stale variant"
    assert onnx_export.check_export(folder.parent / "int8") and onnx_export.check_export(folder)
