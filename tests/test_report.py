"""report.py: the example, paper and agreement tables, checked pairs, plots."""

import json

from conftest import make_tiny
from helpers import (
    DOCS,
    MANY_QRELS,
    MANY_QUERIES,
    MORE_DOCS,
    QRELS,
    QUERIES,
    evaluate,
    exit_2,
    make_beir,
    run_evaluation,
    speed_file,
    write,
)

import report
from qdistill import plots


def test_report_rows_are_the_backend_and_the_folder_they_name(tiny_bert, tmp_path, capsys):
    student = make_tiny(tmp_path / "s", "bert", seed=1)
    a = make_beir(tmp_path / "a" / "tiny", DOCS, QUERIES, QRELS)
    b = make_beir(tmp_path / "b" / "tiny", DOCS, {"q1": "yeast bread"}, {"q1": {"d3": 1}})
    rows = evaluate(tiny_bert, [student], [a, b], tmp_path / "out")
    speed = speed_file(tmp_path / "speed.json", student, tiny_bert)
    argv = [
        "example",
        "--teacher_model",
        tiny_bert,
        "--student",
        student,
        "--datasets",
        str(a),
        str(b),
        "--speed",
        speed,
        "--output_path",
        str(tmp_path / "out"),
    ]
    table = report.main(argv)
    # encode_query (torch) latencies, not the ONNX rows of the same file: 2.00x, not 20.00x
    assert "| 20.00 ms | 10.00 ms | 2.00x" in table, table
    for name, key in (("tiny", "tiny"), ("tiny~2", "tiny~2")):
        ndcg = rows[(student, key)]["metrics"]["NDCG@10"]
        assert f"| {name} | zero-shot | " in table and f"{ndcg:.4f}" in table
    # the folders given in another order than evaluated: refused, never the other folder's numbers
    exit_2(report.main, ["example", *argv[1:5], "--datasets", str(b), str(a), *argv[8:]], capsys, "holds results of")


def test_paper_table_gives_each_datasets_retention_beside_its_ndcg(tiny_bert, tmp_path):
    student = make_tiny(tmp_path / "L0-3" / "final", "bert", seed=1)
    a = make_beir(tmp_path / "a" / "tiny", DOCS, QUERIES, QRELS)
    rows = evaluate(tiny_bert, [student], [a], tmp_path / "out")
    speed = speed_file(tmp_path / "speed.json", student, tiny_bert)
    table = report.main(
        ["paper", "--teacher_model", tiny_bert, "--students", student, "--datasets", str(a), "--speed", speed]
        + ["--output_path", str(tmp_path / "out")]
    )
    s, t = rows[(student, "tiny")]["metrics"]["NDCG@10"], rows[(tiny_bert, "tiny")]["metrics"]["NDCG@10"]
    assert f"| {s:.4f} ({s / t:.2f}) |" in table and f"| teacher | {t:.4f} |" in table, table


def test_report_prints_intervals_and_the_agreement_correlation(tmp_path):
    teacher = make_tiny(tmp_path / "t", "bert", seed=0)
    students = [make_tiny(tmp_path / f"s{i}", "bert", seed=i) for i in (1, 2, 3)]
    a = make_beir(tmp_path / "a", MORE_DOCS, MANY_QUERIES, MANY_QRELS)
    run_evaluation(teacher, students, [a], tmp_path / "out")
    table = report.main(
        [
            "agreement",
            "--teacher_model",
            teacher,
            "--students",
            *students,
            "--datasets",
            str(a),
            "--output_path",
            str(tmp_path / "out"),
        ]
    )
    assert "Spearman rank correlation with nDCG@10 retention over 3 (student, dataset) pairs" in table
    assert "- overlap@10: rho = " in table and (tmp_path / "out" / "agreement_vs_retention.png").stat().st_size > 5000
    speed = tmp_path / "speed.json"
    speed.write_text(json.dumps({"results": []}))
    example = report.main(
        [
            "example",
            "--teacher_model",
            teacher,
            "--student",
            students[0],
            "--datasets",
            str(a),
            "--speed",
            str(speed),
            "--output_path",
            str(tmp_path / "out"),
        ]
    )
    assert "| **mean retention, zero-shot** | | | | **" in example and " [" in example.split("mean retention")[1]


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


def test_pareto_front_by_hand():
    # (latency ms, retention): b dominates c (faster and better); d is slowest but best; e duplicates nothing
    points = [(70.0, 1.0), (16.0, 0.93), (17.0, 0.90), (9.0, 0.80), (30.0, 0.92)]
    assert plots.pareto_front(points) == [3, 1, 0]


def test_plot_written(tmp_path):
    points = [(70.0, 1.0), (16.0, 0.93), (17.0, 0.90), (9.0, 0.80)]
    path = tmp_path / "plot.png"
    front = plots.plot_quality_latency(["teacher", "[0,11]", "[0,10]", "[11]"], points, path, "test")
    assert front == [3, 1, 0]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_report_refuses_a_stale_result_over_a_given_approximate_index(pair, tmp_path, capsys):
    """A student's result over a given HNSW file served at efSearch 7, the teacher's re-made after the file was
    rebuilt at efSearch 16: filed as given-hnswflat (never under the exact name) and never paired."""
    import faiss
    import numpy as np
    from sentence_transformers import SentenceTransformer

    teacher, student = pair
    a = make_beir(tmp_path / "a", MORE_DOCS, MANY_QUERIES, MANY_QRELS)
    ids = sorted(MORE_DOCS)
    model = SentenceTransformer(teacher, device="cpu")
    vectors = model.encode_document([(MORE_DOCS[d][0] + " " + MORE_DOCS[d][1]).strip() for d in ids])
    folder = tmp_path / "hnsw"
    folder.mkdir()
    (folder / "docid").write_text("\n".join(ids) + "\n")

    def write_hnsw(ef):
        index = faiss.IndexHNSWFlat(vectors.shape[1], 8, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef
        index.add(np.asarray(vectors, np.float32))
        faiss.write_index(index, str(folder / "index"))

    write_hnsw(7)
    rows = run_evaluation(teacher, [student], [a], tmp_path / "out", "--doc_index", str(folder))["rows"]
    assert {r["doc_index"]["label"] for r in rows} == {"given-hnswflat"}
    speed = write(tmp_path / "speed.json", json.dumps({"results": []}))
    argv = ["example", "--teacher_model", teacher, "--student", student, "--datasets", str(a)]
    argv += ["--speed", speed, "--output_path", str(tmp_path / "out"), "--index", "given-hnswflat"]
    assert "mean retention, zero-shot" in report.main(argv)
    exit_2(report.main, [*argv[:-2], "--index", "flat"], capsys, "missing")  # never under the exact name
    write_hnsw(16)
    run_evaluation(teacher, [], [a], tmp_path / "out", "--doc_index", str(folder))
    exit_2(report.main, argv, capsys, "search settings")
