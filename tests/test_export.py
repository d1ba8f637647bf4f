"""qdistill.onnx_export, lean: exports, their fidelity check, the export cache (tiny models)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny
from helpers import (
    DOCS,
    MORE_DOCS,
    QRELS,
    QUERIES,
    distill_argv,
    distill_with_corpus,
    evaluate,
    exit_2,
    make_beir,
    queries_file,
    write,
)
from sentence_transformers import SentenceTransformer

import distillation
import evaluate_retrieval as er
import serving
from qdistill import (
    lean,
    onnx_export,
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


def test_export_into_a_copy_keeps_the_record(tiny_bert, tmp_path):
    """serving.py's copy of training_text.json: an export scores in-domain where its source does."""
    a = make_beir(tmp_path / "a", MORE_DOCS, QUERIES, QRELS)
    run = distill_with_corpus(tiny_bert, tmp_path, a, "e")
    onnx_export.export(run["final_path"], tmp_path / "onnx", ["a query", "another"], int8=False)
    shutil.copytree(tmp_path / "onnx" / "fp32", tmp_path / "copy")
    rows = evaluate(tiny_bert, [tmp_path / "copy"], [a], tmp_path / "o")
    assert rows[(str(tmp_path / "copy"), "a")]["in_domain_text"]


def test_repairing_a_damaged_fp32_export_keeps_the_int8_one(pair, tmp_path):
    from pathlib import Path

    texts = ["a query about cats", "rocket engines", "bread"]
    first = onnx_export.cached_export("tiny", Path(pair[1]), tmp_path, texts, int8=True, num_threads=1)
    folder = first["fp32"].folder
    (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes()[:1000])
    onnx_export.cached_export("tiny", Path(pair[1]), tmp_path, texts, int8=False, num_threads=1)  # fp32 only wanted
    assert onnx_export.is_export(folder.parent / "int8"), "was: the intact int8 export was deleted as a stale variant"
    assert onnx_export.check_export(folder.parent / "int8") and onnx_export.check_export(folder)
