"""evaluate_speed.py: structure and sanity on CPU with real models; no speed ratio is asserted."""

import json

import pytest
from conftest import DATA, MINILM, needs_data

import common
import evaluate_speed as es


@pytest.mark.slow
@needs_data
def test_speed_structure_real_models(minilm_student, tmp_path):
    student = minilm_student["final_path"]
    out = es.main([
        "--models", MINILM, student, "--queries", str(DATA / "scifact"), "--num_queries", "24", "--repeats", "2",
        "--warmup", "2", "--batch_sizes", "1", "8", "--quantize", "none", "int8", "--devices", "cpu", "cuda",
        "--precision", "fp32", "fp16", "--num_threads", "2", "--output_path", str(tmp_path), "--log_level", "warning",
    ])  # fmt: skip
    saved = json.loads((tmp_path / "speed" / "speed.json").read_text())
    assert saved["num_threads"] == 2 and saved["config"]["hardware"]["cpu"]
    assert saved["token_lengths"]["count"] == 24 and saved["token_lengths"]["p50"] > 3
    rows = out["results"]
    # 2 models x (fp32, int8) x 2 batch sizes x 2 modes; fp16 and cuda are skipped with notes on a CPU machine
    assert len(rows) == 16
    import torch

    if not torch.cuda.is_available():
        assert any("no CUDA GPU" in n for n in out["notes"])
        assert any("fp16 is timed on GPU only" in n for n in out["notes"])
    for r in rows:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["queries_per_second"] > 0
        assert r["cosine_vs_fp32"] > 0.95, r  # int8 close to fp32
        if (r["model"], r["variant"]) != (MINILM, "fp32"):
            assert r["speedup"]["min"] <= r["speedup"]["median"] <= r["speedup"]["max"]
            assert len(r["speedup"]["per_round"]) == 2
    by = {(r["model"], r["variant"], r["batch_size"], r["mode"]) for r in rows}
    assert (student, "int8", 8, "forward") in by and (MINILM, "fp32", 1, "end_to_end") in by
    assert {r["layers"] for r in rows} == {6, 2}
    assert "speedup vs teacher" in (tmp_path / "speed" / "speed.md").read_text()


def test_speed_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        common.cli(
            es.main, ["--models", MINILM, "--queries", str(tmp_path / "none.tsv"), "--output_path", str(tmp_path)]
        )
    assert e.value.code == 2
    (tmp_path / "empty.tsv").write_text("1\t \n")
    with pytest.raises(SystemExit) as e:
        common.cli(
            es.main, ["--models", MINILM, "--queries", str(tmp_path / "empty.tsv"), "--output_path", str(tmp_path)]
        )
    assert e.value.code == 2
    assert "no non-empty queries" in capsys.readouterr().err
