"""No stale or wrong number: content-true caches, honest in-domain marking, clean failures (fast tier, tiny models).

Each test fails on the code before the fix it names (issue "No stale or wrong number, ever").
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny
from sentence_transformers import SentenceTransformer
from test_defects import QRELS, QUERIES, distill_argv, exit_2, queries_file, write
from test_retrieval import DOCS, make_beir

import distillation
import evaluate_retrieval as er
import evaluate_speed as es
import report
import serving
from qdistill import cli, data, lean, metrics, onnx_export, run_files, search, teacher_outputs

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


# ----------------------------------------------------------------------------- 1. fingerprints see every byte


def test_fingerprint_changes_with_any_byte_of_a_large_weight_file(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    blob = bytearray(np.random.default_rng(0).bytes(6 << 20))  # 6 MiB: over the old 4 MiB sampling threshold
    (folder / "model.safetensors").write_bytes(bytes(blob))
    before = teacher_outputs.model_fingerprint(folder)
    blob[3 << 20] ^= 1  # one bit in the middle: neither the head nor the tail
    (folder / "model.safetensors").write_bytes(bytes(blob))
    assert teacher_outputs.model_fingerprint(folder) != before


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


# ----------------------------------------------------------------------------- 2. report.py shows its own rows


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


# ----------------------------------------------------------------------------- 3. in-domain marking, both ways


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


def test_asymmetric_folder_and_hub_push_carry_the_training_text_record(tiny_bert, tmp_path, monkeypatch):
    import huggingface_hub

    pushed = {}

    class FakeApi:
        def whoami(self):
            return {"name": "me"}

        def create_repo(self, repo_id, exist_ok=False):
            pushed["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, commit_message=""):
            pushed["files"] = sorted(p.name for p in Path(folder_path).iterdir())

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    a = make_beir(tmp_path / "a", MORE_DOCS, QUERIES, QRELS)
    run = distill_with_corpus(
        tiny_bert, tmp_path, a, "asym", "--save_asymmetric", "--push_to_hub", "--hub_model_id", "me/student"
    )
    asym = tmp_path / "out" / "asym" / "asymmetric"
    assert run_files.text_sources(asym) == run_files.text_sources(run["final_path"])
    assert pushed["repo"] == "me/student" and run_files.TRAINING_TEXT in pushed["files"]
    rows = evaluate(tiny_bert, [run["final_path"], asym], [a], tmp_path / "out")
    assert rows[(run["final_path"], "a")]["in_domain_text"] and rows[(str(asym), "a")]["in_domain_text"]


# ----------------------------------------------------------------------------- 4. runs reused only by recipe


def test_skip_finished_reuses_only_a_run_of_the_same_recipe(tiny_bert, tmp_path):
    qfile = queries_file(tmp_path)
    argv = distill_argv(tiny_bert, tmp_path / "out", qfile, "--run_name", "r", "--skip_finished")
    first = distillation.main(argv)["runs"][0]
    again = distillation.main(argv)["runs"][0]
    assert again.get("reused") and again["dev_mse"] == first["dev_mse"]
    with pytest.raises(cli.UsageError, match="no finished run of this recipe"):  # never silently replaced
        distillation.main([*argv, "--learning_rate", "5e-3"])
    other = distillation.main([*argv, "--learning_rate", "5e-3", "--overwrite_output_dir"])["runs"][0]
    assert not other.get("reused")
    config = json.loads((tmp_path / "out" / "r" / "metrics.json").read_text())["config"]
    assert config["recipe"]["flags"]["learning_rate"] == 5e-3


# ----------------------------------------------------------------------------- 7. the leak guard


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


# ----------------------------------------------------------------------------- 8. caches keyed completely


def test_labels_rerun_equals_fresh_and_supersets_serve_subsets(tiny_bert, tmp_path):
    teacher = SentenceTransformer(tiny_bert, device="cpu")
    texts = [f"query {i} about things" for i in range(30)]
    fresh, cached = teacher_outputs.teacher_labels(teacher, tiny_bert, texts, tmp_path, 32)
    again, cached_again = teacher_outputs.teacher_labels(teacher, tiny_bert, texts, tmp_path, 32)
    assert not cached and cached_again and np.array_equal(fresh, again), "no fp16 rounding on the rerun"
    sub, from_superset = teacher_outputs.teacher_labels(teacher, tiny_bert, texts[5:12], tmp_path, 32)
    assert from_superset and np.array_equal(sub, fresh[5:12])
    # a killed save of the old order: texts written, no .npy. Later runs skip it instead of crashing
    (next(tmp_path.glob("labels/*")) / "dead.texts.json").write_text(json.dumps(texts[:3] + ["other"]))
    other, hit = teacher_outputs.teacher_labels(teacher, tiny_bert, texts[:3], tmp_path, 32)
    assert hit and np.array_equal(other, fresh[:3])
    new, hit = teacher_outputs.teacher_labels(teacher, tiny_bert, ["a text never labelled"], tmp_path, 32)
    assert not hit and new.shape == (1, 32)


def test_part_of_a_corpus_gets_its_own_index(tiny_bert, tmp_path):
    teacher = SentenceTransformer(tiny_bert, device="cpu")
    folder = make_beir(tmp_path / "c", MORE_DOCS, QUERIES, QRELS)
    corpus, file = data.load_corpus(folder)
    _, ids_all, meta_all = teacher_outputs.teacher_index(teacher, "t", tiny_bert, corpus, file, tmp_path)
    part = {k: corpus[k] for k in sorted(corpus)[:10]}
    _, ids_part, meta_part = teacher_outputs.teacher_index(teacher, "t", tiny_bert, part, file, tmp_path)
    assert len(ids_part) == 10 and len(ids_all) == 44 and meta_part["folder"] != meta_all["folder"]


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


# ----------------------------------------------------------------------------- 9, 12, 14: refused, one line


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


def test_one_corpus_given_twice_is_refused(tiny_bert, tmp_path, capsys):
    a = make_beir(tmp_path / "a", DOCS, QUERIES, QRELS)
    qfile = queries_file(tmp_path)
    twice = distill_argv(tiny_bert, tmp_path / "o", qfile, "--train_queries", qfile, f"corpus:{a}", f"corpus:{a}")
    with pytest.raises(SystemExit) as e:
        distillation.parse_args(twice)
    assert e.value.code == 2 and "twice" in capsys.readouterr().err
    spelled = distill_argv(
        tiny_bert,
        tmp_path / "o",
        qfile,
        "--train_queries",
        qfile,
        f"corpus:{a}",
        f"corpus:{a}/../a",
        "--max_train_queries",
        "60",
    )
    exit_2(distillation.main, spelled, capsys, "are the same collection")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


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


def test_run_and_export_folders_are_named_for_what_they_are(tiny_bert, tmp_path, capsys):
    run = distillation.main(distill_argv(tiny_bert, tmp_path / "out", queries_file(tmp_path), "--run_name", "r"))
    run_dir = Path(run["runs"][0]["run_dir"])
    ds = make_beir(tmp_path / "tiny", DOCS, QUERIES, QRELS)
    exit_2(
        er.main,
        ["--teacher_model", tiny_bert, "--models", str(run_dir), "--datasets", str(ds)],
        capsys,
        "did you mean",
    )
    onnx_export.export(run_dir / "final", tmp_path / "onnx", ["a query", "another"], int8=False)
    exit_2(
        er.main,
        ["--teacher_model", tiny_bert, "--models", str(tmp_path / "onnx"), "--datasets", str(ds)],
        capsys,
        "holds ONNX exports",
    )
    exit_2(
        serving.main,
        ["--model", str(tmp_path / "onnx" / "fp32"), "--queries", str(ds)],
        capsys,
        "already an ONNX export",
    )


# ----------------------------------------------------------------------------- 9, 11, 15: exports


def test_export_folder_holds_one_model_and_damaged_exports_are_caught(tiny_bert, tmp_path, capsys):
    texts = ["a query about cats", "rocket engines"]
    onnx_export.export(tiny_bert, tmp_path / "onnx", texts, int8=True)
    other = make_tiny(tmp_path / "s", "bert", seed=5)
    onnx_export.export(other, tmp_path / "onnx", texts, int8=False)
    assert not (tmp_path / "onnx" / "int8").exists(), "the first model's int8/ is not left beside the second's fp32/"
    ds = make_beir(tmp_path / "tiny", DOCS, QUERIES, QRELS)
    fp32 = tmp_path / "onnx" / "fp32"
    graph = (fp32 / "model.onnx").read_bytes()
    argv = [
        "--teacher_model",
        tiny_bert,
        "--models",
        str(fp32),
        "--datasets",
        str(ds),
        "--output_path",
        str(tmp_path / "o"),
    ]
    (fp32 / "model.onnx").write_bytes(graph[: len(graph) // 2])
    exit_2(er.main, argv, capsys, "damaged export")
    (fp32 / "model.onnx").write_bytes(graph)
    (fp32 / lean.EXPORT_FILE).write_text("{not json")
    exit_2(er.main, argv, capsys, "malformed")
    assert not (tmp_path / "o" / "index").exists(), "checked before the teacher's index"


def test_damaged_cached_export_is_rebuilt_and_sessions_use_the_thread_count(tiny_bert, tmp_path):
    texts = ["a query about cats", "rocket engines", "bread"]
    first = onnx_export.cached_export("tiny", Path(tiny_bert), tmp_path, texts, int8=False, num_threads=1)
    assert first["fp32"].session.get_session_options().intra_op_num_threads == 1
    folder = first["fp32"].folder
    (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes()[:1000])
    again = onnx_export.cached_export("tiny", Path(tiny_bert), tmp_path, texts, int8=False, num_threads=1)
    ref = SentenceTransformer(tiny_bert, device="cpu").encode_query(texts)
    assert np.allclose(again["fp32"].encode(texts), ref, atol=1e-4)


def test_an_export_below_the_fidelity_floor_is_refused_unless_accepted(tiny_bert, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(onnx_export, "cosine_rows", lambda a, b: np.full(len(a), 0.95))
    q = write(tmp_path / "q.tsv", "1\ta query\n2\tanother query\n")
    argv = ["--model", tiny_bert, "--queries", q, "--output_path", str(tmp_path / "onnx"), "--no_int8"]
    exit_2(serving.main, argv, capsys, "not the same model")
    assert not (tmp_path / "onnx" / "fp32").exists(), "nothing half-written"
    out = serving.main([*argv, "--accept_low_fidelity"])
    assert out["fp32"]["cosine_to_torch"] == pytest.approx(0.95)


# ----------------------------------------------------------------------------- 15. triples need no top-k


def test_margin_triples_compute_no_training_top_k(tiny_bert, tmp_path, monkeypatch):
    sizes = []
    real = search.exact_top_k
    monkeypatch.setattr(search, "exact_top_k", lambda q, *a, **k: sizes.append(len(q)) or real(q, *a, **k))
    qfile = queries_file(tmp_path)
    coll = write(tmp_path / "coll.tsv", "".join(f"p{i}\tpassage {i} about topic {i % 7}\n" for i in range(20)))
    triples = write(tmp_path / "t.tsv", "".join(f"9\t5\t{i}\tp{i % 20}\tp{(i + 3) % 20}\n" for i in range(80)))
    run = distillation.main(
        distill_argv(
            tiny_bert,
            tmp_path / "out",
            qfile,
            "--loss",
            "margin_mse:1.0",
            "--margin_triples",
            triples,
            "--triples_collection",
            coll,
        )
    )
    assert sizes == [5], "only the 5 dev queries get candidates (for the KL metric); training queries none"
    assert run["runs"][0]["train_texts"] > 0


# ----------------------------------------------------------------------------- 16. device plumbing (CPU-checkable)


def test_a_second_gpu_is_selected_with_cuda_visible_devices(tiny_bert, tmp_path):
    args = distillation.parse_args(distill_argv(tiny_bert, tmp_path, queries_file(tmp_path), "--device", "cuda:1"))
    with pytest.raises(cli.UsageError, match="CUDA_VISIBLE_DEVICES=1"):
        distillation.check_inputs(args, "cuda:1")


# ----------------------------------------------------------------------------- coverage: dot teachers, grouping


def make_dot_teacher(folder: Path) -> str:
    """A tiny teacher scored by dot product with unnormalised embeddings (as msmarco-bert-base-dot-v5)."""
    path = make_tiny(folder, "bert", seed=7)
    st = SentenceTransformer(path, device="cpu")
    dot = SentenceTransformer(modules=[st[0], st[1]], device="cpu", similarity_fn_name="dot")
    dot.save(str(folder / "dot"))
    return str(folder / "dot")


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


def test_export_into_a_copy_keeps_the_record(tiny_bert, tmp_path):
    """serving.py's copy of training_text.json: an export scores in-domain where its source does."""
    a = make_beir(tmp_path / "a", MORE_DOCS, QUERIES, QRELS)
    run = distill_with_corpus(tiny_bert, tmp_path, a, "e")
    onnx_export.export(run["final_path"], tmp_path / "onnx", ["a query", "another"], int8=False)
    shutil.copytree(tmp_path / "onnx" / "fp32", tmp_path / "copy")
    rows = evaluate(tiny_bert, [tmp_path / "copy"], [a], tmp_path / "o")
    assert rows[(str(tmp_path / "copy"), "a")]["in_domain_text"]


# ----------------------------------------------------------------------------- one export location, one encode call


def test_speed_times_an_exported_folder_and_records_the_command_given(tiny_bert, tmp_path):
    q = write(tmp_path / "q.tsv", "".join(f"{i}\tquery {i} about topic {i % 3}\n" for i in range(12)))
    serving.main(["--model", tiny_bert, "--queries", q, "--output_path", str(tmp_path / "onnx"), "--no_int8"])
    argv = [
        "--models",
        tiny_bert,
        str(tmp_path / "onnx" / "fp32"),
        "--queries",
        q,
        "--num_queries",
        "4",
        "--repeats",
        "1",
        "--warmup",
        "1",
        "--batch_sizes",
        "1",
        "--output_path",
        str(tmp_path),
        "--num_threads",
        "1",
        "--log_level",
        "error",
    ]
    out = es.main(argv)
    rows = [r for r in out["results"] if r["model"] == str(tmp_path / "onnx" / "fp32")]
    assert {r["backend"] for r in rows} == {"onnx", "tokenizer only"} and rows[0]["dim"] == 32
    assert rows[0]["layers"] == 4 and "speedup" in rows[0]
    assert out["config"]["command"] == "evaluate_speed.py " + " ".join(argv)
    assert out["config"]["git_dirty"] in (True, False)
    # the one export location: onnx_export.cached_export finds what an earlier call wrote, keyed by content
    first = onnx_export.cached_export("tiny", tiny_bert, tmp_path, ["a", "b"], int8=False)
    assert onnx_export.export_folder("tiny", tiny_bert, tmp_path) == first["fp32"].folder.parent


def test_the_dev_set_is_encoded_once_per_evaluation(tiny_bert):
    from qdistill import losses

    student = SentenceTransformer(tiny_bert, device="cpu")
    calls = []
    real = student.encode_query
    student.encode_query = lambda *a, **k: calls.append(1) or real(*a, **k)
    labels = np.random.default_rng(1).normal(size=(3, 32)).astype(np.float32)
    out = losses.make_evaluator(["a", "b", "c"], labels, 8)(student)
    assert len(calls) == 1 and "dev_cosine" in out and "dev_negative_mse" in out
