"""Document text as training text: seeded query-like spans, never an evaluation query, marked in-domain."""

import json

import numpy as np
import pytest
from conftest import DATA, needs_data
from test_defects import QRELS, QUERIES, distill_argv, queries_file
from test_retrieval import DOCS, make_beir

import distillation
import evaluate_retrieval as er
from qdistill import data, training_text


@needs_data
def test_spans_are_seeded_query_like_and_never_evaluation_queries():
    corpus, _, held_out = training_text.corpus_source(f"corpus:{DATA / 'scifact'}", DATA)
    queries = list(data.read_queries(DATA / "queries" / "msmarco-train-sample.tsv").values())[:5000]
    lengths = [len(q.split()) for q in queries]
    # one SciFact query copied into a document's title: the sampler must never hand it back
    doc_id = sorted(corpus)[0]
    evaluation_query = next(iter(data.read_queries(DATA / "scifact" / "queries.jsonl").values()))
    corpus[doc_id] = {**corpus[doc_id], "title": evaluation_query}
    spans = training_text.sample_spans(corpus, 3000, lengths, seed=7, exclude=held_out)
    assert spans == training_text.sample_spans(corpus, 3000, lengths, seed=7, exclude=held_out)
    assert spans != training_text.sample_spans(corpus, 3000, lengths, seed=8, exclude=held_out)
    assert len(spans) == 3000 == len({s.lower() for s in spans})
    assert not {s.lower() for s in spans} & held_out and evaluation_query.lower() in held_out
    windows = [len(s.split()) for s in spans]
    # titles aside, window lengths follow the queries' (median 6 words on MS MARCO)
    assert abs(np.median(windows) - np.median(lengths)) <= 3 and np.percentile(windows, 90) <= 20


def test_mixed_training_text_counts_and_dev_disjoint(tmp_path):
    folder = make_beir(tmp_path / "tiny", DOCS, QUERIES, QRELS)
    corpus, _, held_out = training_text.corpus_source(f"corpus:{folder}", tmp_path)
    qfile = queries_file(tmp_path, 200)
    train, dev, counts = training_text.training_texts(
        [qfile], [("corpus:tiny", corpus, held_out)], num_dev=20, max_train=60, corpus_share=0.1, seed=1
    )
    assert counts["queries"] == 54 and counts["corpus:tiny"] <= 6 and len(train) == 54 + counts["corpus:tiny"]
    assert not {t.lower() for t in train} & ({d.lower() for d in dev} | held_out)
    with pytest.raises(data.UsageError, match="needs --max_train_queries"):
        training_text.training_texts([], [("corpus:tiny", corpus, held_out)])


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


@pytest.mark.slow
@needs_data
def test_token_alignment_lowers_heldout_mse_at_equal_steps(shared_output):
    """Same queries, same steps: adding the last-layer token term brings the student closer to the teacher."""
    from conftest import MINILM, distill_real

    def run(name, *extra):
        flags = [
            "--num_layers",
            "2",
            "--learning_rate",
            "1e-3",
            "--per_device_train_batch_size",
            "64",
            "--loss",
            "cosine",
            "--freeze_embeddings",
            "--student_dropout",
            "0",
        ]
        return distill_real(MINILM, shared_output, name, *flags, *extra, max_train_queries=1500)

    pooled, token = run("pooled-only"), run("token", "--token_loss_weight", "1.0")
    assert pooled["train_steps"] == token["train_steps"]
    assert token["dev_mse"] < pooled["dev_mse"], (token["dev_mse"], pooled["dev_mse"])
