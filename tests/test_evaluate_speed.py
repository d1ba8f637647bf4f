"""evaluate_speed.py: the side-by-side timing harness."""

import json

import numpy as np
import pytest
import torch
from conftest import DATA, MINILM, needs_data
from helpers import exit_2, write

import evaluate_speed as es
import serving
from qdistill import cli, onnx_export


def test_speed_with_nothing_to_time_exits_2(tmp_path, capsys):
    q = write(tmp_path / "q.tsv", "1\tquery\n")
    argv = [
        "--models",
        "no/model",
        "--queries",
        q,
        "--devices",
        "cpu",
        "--precision",
        "fp16",
        "--output_path",
        str(tmp_path),
    ]
    exit_2(es.main, argv, capsys, "nothing to time")
    plan, notes = es.plan_variants(["cpu", "cuda"], ["fp32", "fp16"], ["none", "int8"], cuda=False)
    assert plan == [("cpu", "fp32"), ("cpu", "int8")] and len(notes) == 2
    plan, _ = es.plan_variants(["cpu", "cuda"], ["fp32", "fp16"], ["none", "int8"], cuda=True)
    assert plan == [("cpu", "fp32"), ("cpu", "int8"), ("cuda", "fp32"), ("cuda", "fp16")]


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


@pytest.mark.slow
@needs_data
def test_speed_rows_follow_the_plan_real_models(minilm_student, tmp_path):
    student = minilm_student["final_path"]
    out = es.main(
        [
            "--models",
            MINILM,
            student,
            "--queries",
            str(DATA / "scifact"),
            "--num_queries",
            "24",
            "--repeats",
            "2",
            "--warmup",
            "2",
            "--batch_sizes",
            "1",
            "8",
            "--quantize",
            "none",
            "int8",
            "--devices",
            "cpu",
            "cuda",
            "--precision",
            "fp32",
            "fp16",
            "--num_threads",
            "2",
            "--output_path",
            str(tmp_path),
            "--log_level",
            "warning",
        ]
    )
    saved = json.loads((tmp_path / "speed" / "speed.json").read_text())
    assert saved["num_threads"] == 2 and saved["config"]["hardware"]["cpu"]
    assert saved["token_lengths"]["count"] == 24 and saved["token_lengths"]["p50"] > 3
    plan, notes = es.plan_variants(["cpu", "cuda"], ["fp32", "fp16"], ["none", "int8"], torch.cuda.is_available())
    expected = {
        (m, d, "torch", v, b, mode)
        for m in (MINILM, student)
        for d, v in plan
        for b in (1, 8)
        for mode in ("end_to_end", "forward")
    }
    rows = out["results"]
    assert {
        (r["model"], r["device"], r["backend"], r["variant"], r["batch_size"], r["mode"]) for r in rows
    } == expected
    assert len(rows) == len(expected) and all(n in out["notes"] for n in notes) and es.INT8_NOTE in out["notes"]
    for r in rows:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["calls"] == 2 * -(-24 // r["batch_size"])
        is_reference = (r["model"], r["backend"], r["variant"]) == (MINILM, "torch", "fp32")
        assert ("speedup" in r) == (not is_reference), r
        if "speedup" in r:  # the median of the per-round ratios, one per interleaved round
            assert len(r["speedup"]["per_round"]) == 2
            assert r["speedup"]["median"] == pytest.approx(float(np.median(r["speedup"]["per_round"])))
        if r["variant"] == "int8":  # really quantized: close to fp32, but not identical
            assert 0.95 < r["cosine_vs_fp32"] < 0.99999, r
    assert {r["layers"] for r in rows} == {6, 2}
    assert "speedup vs teacher" in (tmp_path / "speed" / "speed.md").read_text()


def test_speed_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.cli(es.main, ["--models", MINILM, "--queries", str(tmp_path / "none.tsv"), "--output_path", str(tmp_path)])
    assert e.value.code == 2
    (tmp_path / "empty.tsv").write_text("1\t \n")
    with pytest.raises(SystemExit) as e:
        cli.cli(
            es.main, ["--models", MINILM, "--queries", str(tmp_path / "empty.tsv"), "--output_path", str(tmp_path)]
        )
    assert e.value.code == 2
    assert "no non-empty queries" in capsys.readouterr().err
