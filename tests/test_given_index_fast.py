"""The given-index readers and the chunked exact search, without models: fast tier."""

import json

import numpy as np
import pytest

import distillation
import evaluate_retrieval
from qdistill import cli, given_index, index_check, search


def test_ids_read_compactly_and_checked(tmp_path):
    f = tmp_path / "docid"
    f.write_bytes("a1\r\nβ-2\nc3\n".encode())
    ids = given_index.read_ids(f)
    assert len(ids) == 3 and ids[1] == "β-2" and list(ids) == ["a1", "β-2", "c3"] and ids[-1] == "c3"
    j = tmp_path / "ids.json"
    j.write_text(json.dumps(["a1", "β-2", "c3"]))
    assert list(given_index.read_ids(j)) == list(ids) and given_index.read_ids(j).sha256 == ids.sha256
    for name, content, message in (
        ("dup", b"x\ny\nx\n", "'x' appears more than once"),
        ("blank", b"x\n\ny\n", "line 2 is empty"),
        ("latin1", "é\n".encode("latin-1"), "not UTF-8"),
        ("empty", b"\n", "is empty"),
        ("bad.json", b"[1, 2", "not valid JSON"),
    ):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(cli.UsageError, match=message):
            given_index.read_ids(tmp_path / name)


def test_npy_header_checked(tmp_path):
    ids = given_index.IdList.from_list(["a", "b"])
    np.save(tmp_path / "int.npy", np.zeros((2, 4), np.int32))
    np.save(tmp_path / "3d.npy", np.zeros((2, 4, 1), np.float32))
    np.save(tmp_path / "ok.npy", np.zeros((2, 4), np.float16))
    with pytest.raises(cli.UsageError, match="float32/float16"):
        given_index.open_npy(tmp_path / "int.npy", ids)
    with pytest.raises(cli.UsageError, match="float32/float16"):
        given_index.open_npy(tmp_path / "3d.npy", ids)
    (tmp_path / "cut.npy").write_bytes((tmp_path / "ok.npy").read_bytes()[:-3])
    with pytest.raises(cli.UsageError, match="truncated"):
        given_index.open_npy(tmp_path / "cut.npy", ids)
    (tmp_path / "text.npy").write_text("not an array")
    with pytest.raises(cli.UsageError, match="not a readable .npy"):
        given_index.open_npy(tmp_path / "text.npy", ids)
    assert given_index.open_npy(tmp_path / "ok.npy", ids).dtype == "float16"


@pytest.mark.parametrize("normalize", [False, True])
def test_chunked_exact_search_is_one_flat_index(tmp_path, normalize):
    """A .npy searched in chunks gives the scores and rows of one faiss IndexFlatIP over the whole, float16 too."""
    import faiss

    rng = np.random.default_rng(0)
    docs = rng.standard_normal((5000, 24)).astype(np.float32)
    q = rng.standard_normal((30, 24)).astype(np.float32)
    np.save(tmp_path / "d.npy", docs)
    index = given_index.open_npy(tmp_path / "d.npy", given_index.IdList.from_list(map(str, range(5000))))
    flat = faiss.IndexFlatIP(24)
    flat.add(search.unit(docs) if normalize else docs)
    want_s, want_i = flat.search(search.unit(q) if normalize else q, 50)
    got_s, got_i = search.exact_search(q, index.chunks(rows=1024), 50, normalize)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_s, want_s)
    assert index.rows_of(["4999", "7", "nope"]) == [4999, 7, None]
    np.testing.assert_array_equal(index.vectors([3, 1]), docs[[3, 1]])
    np.save(tmp_path / "h.npy", docs.astype(np.float16))
    half = given_index.open_npy(tmp_path / "h.npy", index.ids)
    assert half.search(q, 10, normalize)[1].shape == (30, 10)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--doc_ids", "x"], "--doc_ids goes with --doc_index"),
        (["--doc_index", "a", "b", "--doc_ids", "x"], "--doc_ids lists 1 files, --doc_index 2"),
        (["--doc_index", "a", "--export_index", "out"], "--export_index writes indexes this script builds"),
    ],
)
def test_evaluate_flags_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate_retrieval.parse_args(["--datasets", "scifact", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--doc_index", "idx"], "--doc_index serves the score terms"),
        (["--doc_ids", "x"], "--doc_ids goes with --doc_index"),
        (["--teacher_query_ids", "x"], "--teacher_query_ids goes with --teacher_query_embeddings"),
    ],
)
def test_distillation_flags_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        distillation.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_given_index_count_and_folder_checked(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros((3, 4), np.float32))
    (tmp_path / "ids").write_text("a\nb\n")
    with pytest.raises(cli.UsageError, match="holds 3 vectors but its id file lists 2 ids"):
        given_index.open_index(tmp_path / "v.npy", tmp_path / "ids")
    with pytest.raises(cli.UsageError, match="pass its document ids with --doc_ids"):
        given_index.open_index(tmp_path / "v.npy")
    (tmp_path / "folder").mkdir()
    with pytest.raises(cli.UsageError, match="not in pyserini's layout"):
        given_index.open_index(tmp_path / "folder")
    with pytest.raises(cli.UsageError, match="milvus:<uri>#<collection>"):
        given_index.open_index("milvus:nocollection")


@pytest.mark.parametrize("kind", ["IVFFlat", "IVFPQ", "PQ"])
def test_ivf_and_pq_files_checked_as_built(tmp_path, kind):
    """IVF and PQ faiss files: vectors (IVF-flat) or codes (PQ) compared with what the teacher gives; a file whose
    ids are in another order is refused. The teacher here is the vectors themselves (no model in the fast tier)."""
    import faiss

    rng = np.random.default_rng(0)
    docs = search.unit(rng.standard_normal((3000, 32)).astype(np.float32))
    ids = [f"d{i}" for i in range(3000)]
    quantizer = faiss.IndexFlatIP(32)
    index = {
        "IVFFlat": lambda: faiss.IndexIVFFlat(quantizer, 32, 16, faiss.METRIC_INNER_PRODUCT),
        "IVFPQ": lambda: faiss.IndexIVFPQ(quantizer, 32, 16, 8, 8, faiss.METRIC_INNER_PRODUCT),
        "PQ": lambda: faiss.IndexPQ(32, 8, 8, faiss.METRIC_INNER_PRODUCT),
    }[kind]()
    index.train(docs)
    index.add(docs)
    faiss.write_index(index, str(tmp_path / "index"))
    (tmp_path / "docid").write_text("\n".join(ids) + "\n")
    given = given_index.open_index(tmp_path)
    corpus = {d: {"title": "", "text": d} for d in ids}
    by_id = dict(zip(ids, docs))
    record = index_check.verify(given, lambda sample: np.stack([by_id[d] for d in sample]), corpus, "cosine", "T", 0)
    assert record["index_verified"] and record["median_cosine"] > 0.999
    assert ("codes" in record["method"]) == (kind != "IVFFlat")
    shifted = dict(zip(ids, np.roll(docs, 1, axis=0)))  # ids one row off
    with pytest.raises(cli.UsageError, match="does not match teacher T"):
        index_check.verify(given, lambda sample: np.stack([shifted[d] for d in sample]), corpus, "cosine", "T", 0)
    with pytest.raises(cli.UsageError, match="scores by dot"):
        l2 = given_index.DocIndex(tmp_path / "index", ids, 32, "faiss", metric="l2")
        index_check.check_shape(l2, 32, "dot", "T")
