"""qdistill.teacher_outputs: content-true keys, teacher labels and the document index built here."""

import json

import numpy as np
import pytest
from conftest import DATA, MINILM, TRAIN_TSV, needs_data
from helpers import MORE_DOCS, QRELS, QUERIES, cosine_rows, make_beir
from sentence_transformers import SentenceTransformer

from qdistill import data, encoders, teacher_outputs


def test_fingerprint_changes_with_any_byte_of_a_large_weight_file(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    blob = bytearray(np.random.default_rng(0).bytes(6 << 20))  # 6 MiB: over the old 4 MiB sampling threshold
    (folder / "model.safetensors").write_bytes(bytes(blob))
    before = teacher_outputs.model_fingerprint(folder)
    blob[3 << 20] ^= 1  # one bit in the middle: neither the head nor the tail
    (folder / "model.safetensors").write_bytes(bytes(blob))
    assert teacher_outputs.model_fingerprint(folder) != before


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


@pytest.mark.slow
@needs_data
def test_multi_process_labelling_and_indexing_equal_single_process(tmp_path):
    teacher, path = encoders.load_model(MINILM)
    texts = list(data.read_queries(TRAIN_TSV).values())[:300]
    one, _ = teacher_outputs.teacher_labels(teacher, path, texts, tmp_path / "a", 128)
    two, _ = teacher_outputs.teacher_labels(teacher, path, texts, tmp_path / "b", 128, devices=["cpu", "cpu"])
    assert cosine_rows(one, two).min() >= 0.9999
    corpus, file = data.load_corpus(DATA / "cranfield")
    corpus = {k: corpus[k] for k in sorted(corpus)[:300]}
    e1, ids1, _ = teacher_outputs.teacher_index(teacher, MINILM, path, corpus, file, tmp_path / "a")
    e2, ids2, _ = teacher_outputs.teacher_index(
        teacher, MINILM, path, corpus, file, tmp_path / "b", devices=["cpu", "cpu"]
    )
    assert ids1 == ids2 and cosine_rows(np.asarray(e1), np.asarray(e2)).min() >= 0.9999
