"""qdistill.data, training_text: query files, BEIR folders, spans of documents, augmentation."""

import json

import numpy as np
import pytest
from conftest import DATA, needs_data
from helpers import DOCS, QRELS, QUERIES, distill_argv, exit_2, make_beir, queries_file, write

import distillation
from qdistill import data, training_text
from qdistill.cli import UsageError


def test_duplicate_ids_are_errors(tmp_path):
    folder = make_beir(tmp_path / "dup", DOCS, QUERIES, QRELS)
    with open(folder / "queries.jsonl", "a") as f:
        f.write(json.dumps({"_id": "q1", "text": "another text"}) + "\n")
    with pytest.raises(UsageError, match="duplicate id 'q1'"):
        data.load_beir(folder)
    with pytest.raises(UsageError, match="duplicate id '7'"):
        data.read_queries(write(tmp_path / "q.tsv", "7\ta\n8\tb\n7\tc\n"))


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


def test_augment_is_seeded_and_perturbs():
    texts = ["what is the capital of france", "cats"]
    a = training_text.augment_queries(texts, 3, "[MASK]", seed=1)
    assert a == training_text.augment_queries(texts, 3, "[MASK]", seed=1) and len(a) == 6
    assert all(v != texts[i // 3] for i, v in enumerate(a[:3]))
    assert a[3:] == ["[MASK]"] * 3  # one-word queries can only be masked


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
