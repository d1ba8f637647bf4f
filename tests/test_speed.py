"""evaluate_speed.py: the rows follow the plan on any machine; int8 really quantizes; no ratio is asserted."""

import json

import numpy as np
import pytest
import torch
from conftest import DATA, MINILM, needs_data

import evaluate_speed as es
from qdistill import cli


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
