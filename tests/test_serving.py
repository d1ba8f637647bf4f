"""serving.py: ONNX Runtime export of a real 2-layer MiniLM student, the lean query path, its retention."""

import json

import numpy as np
import pytest
from conftest import DATA, MINILM, make_tiny, needs_data
from sentence_transformers import SentenceTransformer

import evaluate_retrieval as er
import evaluate_speed as es
import serving
from qdistill import cli, data, lean, onnx_export, run_files, students


def cosine(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.slow
@needs_data
def test_export_lean_path_and_exported_retention(minilm_student, scifact_eval, shared_output, tmp_path):
    queries = list(data.read_queries(DATA / "scifact" / "queries.jsonl").values())
    out = serving.main(
        [
            "--model",
            minilm_student["final_path"],
            "--queries",
            str(DATA / "scifact"),
            "--output_path",
            str(tmp_path / "onnx"),
            "--log_level",
            "warning",
        ]
    )
    assert out["fp32"]["cosine_to_torch"] >= 0.999 and out["int8"]["cosine_to_torch"] >= 0.98
    torch_emb = SentenceTransformer(minilm_student["final_path"], device="cpu").encode_query(queries[300:500])
    fp32 = lean.LeanEncoder(tmp_path / "onnx" / "fp32").encode(queries[300:500])
    int8 = lean.LeanEncoder(tmp_path / "onnx" / "int8").encode(queries[300:500])
    assert cosine(fp32, torch_emb).min() >= 0.999 and cosine(int8, torch_emb).mean() >= 0.98
    assert cosine(int8, torch_emb).mean() < 0.99999, "int8 really is quantized"

    # the deployed int8 export scored on SciFact against the teacher's index (built once by scifact_eval), beside
    # the torch student: the same retrieval quality within 0.01 nDCG@10
    int8_path, final = str(tmp_path / "onnx" / "int8"), minilm_student["final_path"]
    res = er.main(
        [
            "--teacher_model",
            MINILM,
            "--models",
            final,
            int8_path,
            "--datasets",
            str(DATA / "scifact"),
            "--output_path",
            str(shared_output),
            "--log_level",
            "warning",
        ]
    )
    rows = {r["model"]: r for r in res["rows"]}
    saved = json.loads(
        (shared_output / "retrieval" / run_files.slug(MINILM) / run_files.slug(int8_path) / "scifact.json").read_text()
    )
    assert saved["backend"] == "onnxruntime int8" and saved["agreement"]["overlap@10"]["value"] > 0.5
    assert abs(rows[int8_path]["metrics"]["NDCG@10"] - rows[final]["metrics"]["NDCG@10"]) <= 0.01

    speed = es.main(
        [
            "--models",
            MINILM,
            minilm_student["final_path"],
            "--queries",
            str(DATA / "scifact"),
            "--num_queries",
            "16",
            "--repeats",
            "1",
            "--warmup",
            "1",
            "--batch_sizes",
            "1",
            "--backend",
            "torch",
            "onnx",
            "--quantize",
            "none",
            "int8",
            "--output_path",
            str(tmp_path),
            "--log_level",
            "warning",
        ]
    )
    backends = {(r["model"], r["backend"], r["variant"]) for r in speed["results"]}
    assert (minilm_student["final_path"], "onnx", "int8") in backends and (MINILM, "tokenizer only", "-") in backends
    onnx_row = next(r for r in speed["results"] if r["backend"] == "onnx" and r["model"] != MINILM)
    assert "speedup" in onnx_row and "speedup_same_backend" in onnx_row and onnx_row["cosine_vs_fp32"] >= 0.98


def test_a_model_that_cannot_be_exported_fails_cleanly(tiny_bert, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    teacher = SentenceTransformer(tiny_bert, device="cpu")
    students.save_asymmetric(
        SentenceTransformer(make_tiny(tmp_path / "s", "bert", seed=3)), teacher, tmp_path / "asym"
    )
    (tmp_path / "q.tsv").write_text("1\ta query\n2\tanother query\n")
    argv = [
        "--model",
        str(tmp_path / "asym"),
        "--queries",
        str(tmp_path / "q.tsv"),
        "--output_path",
        str(tmp_path / "onnx"),
    ]
    with pytest.raises(SystemExit) as e:
        cli.cli(serving.main, argv)
    assert e.value.code == 2 and "Router" in capsys.readouterr().err
    assert not (tmp_path / "onnx").exists() or not any((tmp_path / "onnx").iterdir()), "no half-written export"


def test_tiny_export_round_trip(tiny_bert, tmp_path):
    """fp32 export of a tiny BERT equals the torch model through the lean path (no real model: fast tier)."""
    texts = ["a query about cats", "rocket engines", "x"]
    out = onnx_export.export(tiny_bert, tmp_path / "onnx", texts, int8=False)
    assert out["fp32"]["cosine_to_torch"] >= 0.9999
    assert out["fp32"]["fused_ops"].get("Attention") == 4, "ONNX Runtime's optimizer fused every attention block"
    encoder = lean.LeanEncoder(tmp_path / "onnx" / "fp32")
    ref = SentenceTransformer(tiny_bert, device="cpu").encode_query(texts)
    assert np.allclose(encoder.encode(texts), ref, atol=1e-4)
