"""The check of a given index, logged vectors and every number made from them, against the faults users' files have:
NaN and infinite rows anywhere, ids shifted near the end, rows not unit length, a partial corpus, damaged and
hostile faiss files, L2 metrics, credentials in a uri, folders the user keeps. Fast tier: the 'teacher' here is the
vectors themselves (no model), so every case runs in a second."""

import json

import numpy as np
import pytest

from qdistill import cli, given_index, index_check, milvus, query_log, results, run_files, search

N, DIM = 3000, 32


@pytest.fixture(scope="module")
def docs():
    return search.unit(np.random.default_rng(0).standard_normal((N, DIM)).astype(np.float32))


def ids_of(n=N):
    return [f"d{i}" for i in range(n)]


def as_npy(tmp_path, vectors, ids=None, name="emb"):
    np.save(tmp_path / f"{name}.npy", vectors)
    (tmp_path / f"{name}.txt").write_text("\n".join(ids or ids_of(len(vectors))) + "\n")
    return given_index.open_index(tmp_path / f"{name}.npy", tmp_path / f"{name}.txt")


def check(index, docs, similarity="cosine", seed=0, corpus_ids=None, allow_partial=False):
    """index_check.verify with the true vectors as the teacher's re-encoding of each id."""
    by_id = dict(zip(ids_of(len(docs)), docs))
    corpus = {d: {"title": "", "text": d} for d in (corpus_ids or ids_of(len(docs)))}
    return index_check.verify(
        index, lambda sample: np.stack([by_id[d] for d in sample]), corpus, similarity, "T", seed, allow_partial
    )


def test_scores_become_similarities_in_one_place_and_their_order_is_checked():
    rows = np.array([[3, 1, -1]])
    l2 = np.array([[0.1, 0.5, np.inf]], np.float32)  # squared L2 over unit vectors, ascending
    np.testing.assert_allclose(search.to_similarity(l2, rows, "l2", "x")[0, :2], [0.95, 0.75])
    assert search.to_similarity(l2, rows, "l2", "x")[0, 2] == -np.inf  # padding stays last
    with pytest.raises(cli.UsageError, match="not best first by inner product"):
        search.to_similarity(np.array([[0.1, 0.5]], np.float32), rows[:, :2], "ip", "x")
    with pytest.raises(cli.UsageError, match="known metrics"):
        search.to_similarity(l2, rows, "hamming", "x")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_nan_or_inf_row_anywhere_is_refused(tmp_path, docs, seed):
    rng = np.random.default_rng(seed)
    for value in (np.nan, np.inf):
        bad = docs.copy()
        row = int(rng.integers(N))
        bad[row, int(rng.integers(DIM))] = value
        with pytest.raises(cli.UsageError, match=f"row {row} .*NaN or infinite"):
            check(as_npy(tmp_path, bad), docs, seed=seed)
        half = bad.astype(np.float16)  # the float16 path reads every row too
        with pytest.raises(cli.UsageError, match="NaN or infinite"):
            check(as_npy(tmp_path, half, name="half"), docs, seed=seed)


@pytest.mark.parametrize("seed", range(5))
def test_ids_shifted_in_the_last_rows_are_refused_whatever_the_seed(tmp_path, docs, seed):
    ids = ids_of()
    start = N - N // 100 + seed * 5  # somewhere in the last 1% of rows
    shifted = ids[:start] + ids[start + 1 :] + [ids[start]]  # rows from `start` on carry the next row's id
    with pytest.raises(cli.UsageError, match="does not match teacher T"):
        check(as_npy(tmp_path, docs, shifted), docs, seed=seed)
    assert check(as_npy(tmp_path, docs), docs, seed=seed)["index_verified"]


@pytest.mark.parametrize("seed", range(3))
def test_rows_not_unit_length_are_refused_for_an_index_searched_as_built(tmp_path, docs, seed):
    import faiss

    scaled = docs.copy()
    rows = np.random.default_rng(seed).choice(N, int(0.4 * N), replace=False)
    scaled[rows] *= 3
    flat = faiss.IndexFlatIP(DIM)
    flat.add(scaled)
    faiss.write_index(flat, str(tmp_path / "index"))
    (tmp_path / "docid").write_text("\n".join(ids_of()) + "\n")
    with pytest.raises(cli.UsageError, match=f"{len(rows)} of {N} vectors are not unit length"):
        check(given_index.open_index(tmp_path), docs, seed=seed)
    # a dot-product teacher's .npy with 30% of its rows doubled: its norms are the teacher's, row by row
    raw = docs * np.random.default_rng(9).uniform(0.5, 2.0, (N, 1)).astype(np.float32)
    doubled = raw.copy()
    doubled[np.random.default_rng(seed).choice(N, int(0.3 * N), replace=False)] *= 2
    with pytest.raises(cli.UsageError, match="norms differ from teacher T's"):
        check(as_npy(tmp_path, doubled, name="dot"), raw, similarity="dot", seed=seed)
    assert check(as_npy(tmp_path, raw, name="dot-ok"), raw, similarity="dot", seed=seed)["index_verified"]


def test_the_record_says_what_was_checked_and_a_partial_corpus_needs_the_flag(tmp_path, docs):
    record = check(as_npy(tmp_path, docs), docs)
    assert record["rows_scanned"] == N and record["sample"] == index_check.SAMPLE
    assert (
        record["checked"].startswith(f"{index_check.SAMPLE} documents re-encoded")
        and f"all {N} rows" in record["checked"]
    )
    keep = N - N // 20  # 5% of the corpus missing from the index
    partial = as_npy(tmp_path, docs[:keep], ids_of()[:keep], name="partial")
    with pytest.raises(cli.UsageError, match="holds 2850 of the corpus's 3000 documents .*--allow_partial_index"):
        check(partial, docs, corpus_ids=ids_of())
    allowed = check(partial, docs, corpus_ids=ids_of(), allow_partial=True)
    assert allowed["corpus_share_indexed"] == pytest.approx(0.95) and allowed["corpus_docs_missing"] == N - keep


def test_float16_chunks_equal_float32_value_for_value_over_several_chunks(tmp_path, docs):
    half = docs.astype(np.float16)
    a = as_npy(tmp_path, half, name="h")
    b = as_npy(tmp_path, half.astype(np.float32), name="f")
    got = list(a.chunks(rows=700))
    want = list(b.chunks(rows=700))
    assert len(got) == 5 and [s for s, _ in got] == [s for s, _ in want]
    for (_, x), (_, y) in zip(got, want):
        np.testing.assert_array_equal(x, y)
    q = docs[:7]
    np.testing.assert_array_equal(a.search(q, 20, True)[1], b.search(q, 20, True)[1])


def test_damaged_and_hostile_faiss_files_are_one_line(tmp_path, docs):
    import struct

    import faiss

    flat = faiss.IndexFlatIP(DIM)
    flat.add(docs)
    faiss.write_index(flat, str(tmp_path / "index"))
    (tmp_path / "docid").write_text("\n".join(ids_of()) + "\n")
    data = bytearray((tmp_path / "index").read_bytes())
    size = data.find(struct.pack("<Q", N * DIM))  # the stored vectors' length
    assert size > 0
    data[size : size + 8] = struct.pack("<Q", 1 << 37)  # a header that claims 512 GB of floats
    (tmp_path / "huge").mkdir()
    (tmp_path / "huge" / "index").write_bytes(bytes(data))
    (tmp_path / "huge" / "docid").write_text((tmp_path / "docid").read_text())
    with pytest.raises(cli.UsageError, match="claims more memory|cannot be read"):
        given_index.open_index(tmp_path / "huge")
    # an IVF file whose stored ids are not its rows (add_with_ids)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, 8, faiss.METRIC_INNER_PRODUCT)
    ivf.train(docs)
    ivf.add_with_ids(docs, np.arange(N, dtype=np.int64) * 7 + 100)
    (tmp_path / "ivf").mkdir()
    faiss.write_index(ivf, str(tmp_path / "ivf" / "index"))
    (tmp_path / "ivf" / "docid").write_text((tmp_path / "docid").read_text())
    with pytest.raises(cli.UsageError, match="stored ids are not its rows"):
        given_index.open_index(tmp_path / "ivf")
    # OPQ in front of an IVF-PQ (an IndexPreTransform): opened, checked through its codec, labelled approximate
    opq = faiss.index_factory(DIM, "OPQ8,IVF8,PQ8", faiss.METRIC_INNER_PRODUCT)
    opq.train(docs)
    opq.add(docs)
    (tmp_path / "opq").mkdir()
    faiss.write_index(opq, str(tmp_path / "opq" / "index"))
    (tmp_path / "opq" / "docid").write_text((tmp_path / "docid").read_text())
    index = given_index.open_index(tmp_path / "opq")
    assert index.approximate and index.label.startswith("given-pretransform") and index.served() == {"nprobe": 1}
    record = check(index, docs)
    assert record["index_verified"] and "codes" in record["method"]


def test_id_files_with_null_and_messages_with_the_odd_id(tmp_path, docs, caplog):
    (tmp_path / "ids.json").write_text(json.dumps(["a", None, "c"]))
    with pytest.raises(cli.UsageError, match="id None is not a string or an integer"):
        given_index.read_ids(tmp_path / "ids.json")
    stray = [f"{d} " if i == 5 else d for i, d in enumerate(ids_of())]  # a stray space on one id
    caplog.set_level("WARNING", logger="qdistill")  # an earlier test's --log_level error may have raised it
    check(as_npy(tmp_path, docs, stray, name="space"), docs)
    assert "1 corpus documents are not in the index (e.g. 'd5')" in caplog.text
    judged = given_index.open_index(tmp_path / "space.npy", tmp_path / "space.txt")
    with pytest.raises(cli.UsageError, match=r"lacks 1 of the 2 documents the qrels judge \(e.g. 'd5'\)"):
        index_check.check_qrels(judged, {"q": {"d5": 1, "d6": 1}})


def test_export_never_replaces_what_the_user_keeps(tmp_path, docs):
    folder = tmp_path / "export" / "ds"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(cli.UsageError, match="did not write"):
        given_index.export_pyserini(folder, docs, ids_of(), True, "abc")
    assert (folder / "notes.txt").read_text() == "mine"
    fresh = tmp_path / "export" / "new"
    given_index.export_pyserini(fresh, docs, ids_of(), True, "abc")
    given_index.export_pyserini(fresh, docs, ids_of(), True, "abc")  # an earlier export of the same index
    with pytest.raises(cli.UsageError, match="export of another index"):
        given_index.export_pyserini(fresh, docs, ids_of(), True, "other")
    assert given_index.open_index(fresh).ids[0] == "d0"


def test_credentials_never_reach_a_record_or_an_error(tmp_path, capsys):
    spec = "milvus:http://root:hunter2@localhost:1#c"
    info = run_files.run_info({"doc_index": [spec]}, "cpu", ["--doc_index", spec], "x.py")
    assert "hunter2" not in json.dumps(info) and "***@localhost" in json.dumps(info)
    with pytest.raises(cli.UsageError) as e:
        milvus.parse("milvus:http://root:hunter2@localhost:1")
    assert "hunter2" not in str(e.value)
    with pytest.raises(SystemExit):
        cli.cli(lambda argv: milvus.client("/no/such/milvus.db"), [])
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_a_logged_nan_row_and_an_id_in_two_files_are_refused(tmp_path, docs):
    n = 300
    (tmp_path / "q.tsv").write_text("".join(f"q{i}\tquery {i}\n" for i in range(n)))
    vectors = docs[:n].copy()
    vectors[n - 17] = np.nan  # outside any 64-row sample that misses it
    np.save(tmp_path / "v.npy", vectors)
    log = query_log.QueryLog(tmp_path / "v.npy", None, [tmp_path / "q.tsv"])
    by_text = {f"query {i}": docs[i] for i in range(n)}
    with pytest.raises(cli.UsageError, match="row 283 .*NaN"):
        log.verify(lambda texts: np.stack([by_text[t] for t in texts]), "cosine", "T", 0)
    (tmp_path / "other.tsv").write_text("q3\tanother text\n")
    (tmp_path / "ids.txt").write_text("\n".join(f"q{i}" for i in range(n)) + "\n")
    with pytest.raises(cli.UsageError, match="'q3' is in both"):
        query_log.QueryLog(tmp_path / "v.npy", tmp_path / "ids.txt", [tmp_path / "q.tsv", tmp_path / "other.tsv"])


def test_results_pair_by_one_definition_k_values_apart():
    base = {"dataset": "a", "split": "test", "index": "flat", "teacher_index": "t", "k_values": [1, 10, 100]}
    a = {"made_alike": results.made_alike(base), "per_query": {"NDCG@10": {"q": 1.0}}, "model": "s"}
    b = {"made_alike": results.made_alike({**base, "k_values": [10]}), "per_query": {"NDCG@10": {"q": 0.5}}}
    assert results.clean_ratio(a, b) == 2.0  # other k values: a fair exact pair
    c = {**b, "made_alike": results.made_alike({**base, "served": {"efSearch": 16}})}
    with pytest.raises(cli.UsageError, match="the index's search settings"):
        results.paired(a, c)
    with pytest.raises(cli.UsageError, match="Recall@100 is not in both"):
        results.paired(a, b, "Recall@100")


@pytest.fixture(scope="module")
def milvus_db(tmp_path_factory):
    return str(tmp_path_factory.mktemp("milvus") / "m.db")


@pytest.mark.parametrize(
    "metric, int_ids", [("IP", False), ("COSINE", False), ("L2", False), ("L2", True), ("IP", True)]
)
def test_milvus_collections_rank_as_exact_search_whatever_the_metric_and_key(milvus_db, docs, metric, int_ids):
    """The real Milvus engine (Milvus Lite): an L2 collection of unit vectors returns squared distances, lower is
    better, and ranks as the exact inner-product search once converted (before: ranked as similarities)."""
    n = 600
    ids = [str(1000 + i) for i in range(n)] if int_ids else [f"d\"{i}'\\" for i in range(n)]  # quotes, backslash
    name = f"c_{metric}_{int(int_ids)}"
    milvus.write_collection(milvus_db, name, docs[:n], ids, normalize=False, metric=metric, int_ids=int_ids)
    index = milvus.MilvusIndex(f"milvus:{milvus_db}#{name}")
    q = docs[n : n + 20]
    sims, rows = index.search(q, 10, True)
    want = np.argsort(-(q @ docs[:n].T), axis=1)[:, :10]
    assert [[index.ids[r] for r in row] for row in rows] == [[ids[r] for r in row] for row in want]
    np.testing.assert_allclose(sims, np.take_along_axis(q @ docs[:n].T, want, 1), atol=1e-4)
    assert index.label == "flat" and not index.approximate
    # quoted ids read back; the check reads every vector (finite, unit) and gives a content digest
    rows_ = index.rows_of([ids[0], ids[-1]])
    np.testing.assert_allclose(index.vectors(rows_), docs[[0, n - 1]], atol=1e-6)
    record = index_check.scan(index, "cosine", index.path)
    assert record["rows_scanned"] == n and len(index.content_digest()) == 16
    index.count = 10**6  # as a collection of a million rows would be: k above the engine's cap is one line
    with pytest.raises(cli.UsageError, match="at most 16384 results"):
        index.search(q[:1], milvus.MAX_TOP_K + 1, True)


def test_milvus_content_digest_follows_an_upsert_and_approximate_indexes_say_so(milvus_db, docs):
    from pymilvus import MilvusClient

    n = 300
    ids = [f"x{i}" for i in range(n)]
    milvus.write_collection(milvus_db, "up", docs[:n], ids, normalize=False)
    before = milvus.MilvusIndex(f"milvus:{milvus_db}#up").digest()
    c = MilvusClient(uri=milvus_db)
    c.upsert("up", [{"id": ids[i], "vector": docs[n + i].tolist()} for i in range(100, 336 - 64)])
    c.flush("up")
    c.close()
    after = milvus.MilvusIndex(f"milvus:{milvus_db}#up")
    assert after.digest() != before  # the same name, count and ids: another collection by content
    milvus.write_collection(
        milvus_db, "ivf", docs[:n], ids, normalize=False, index_type="IVF_FLAT", index_params={"nlist": 16}
    )
    ivf = milvus.MilvusIndex(f"milvus:{milvus_db}#ivf", {"nprobe": 2})
    assert ivf.approximate and ivf.label == "given-milvus-ivf_flat"
    assert ivf.served() == {
        "index_type": "IVF_FLAT",
        "index_params": {"nlist": "16", "dim": "32"},
        "search_params": {"nprobe": 2},
    }
    assert ivf.digest() != milvus.MilvusIndex(f"milvus:{milvus_db}#ivf", {"nprobe": 4}).digest()


def test_a_nan_validation_loss_stops_training_in_one_line(tiny_bert):
    from sentence_transformers import SentenceTransformer

    from qdistill import losses

    student = SentenceTransformer(tiny_bert, device="cpu")
    labels = np.ones((4, student.get_embedding_dimension()), np.float32)
    labels[2] = np.nan
    evaluator = losses.make_evaluator(["a", "b", "c", "d"], labels, 4)
    with pytest.raises(cli.UsageError, match="not finite before training.*nothing is saved as final"):
        evaluator(student)


def test_the_corpus_text_share_holds_when_the_query_file_is_short(tmp_path, caplog):
    from qdistill import training_text

    caplog.set_level("WARNING", logger="qdistill")
    (tmp_path / "q.tsv").write_text("".join(f"q{i}\tquery number {i} about things\n" for i in range(50)))
    corpus = {f"c{i}": {"title": f"title {i}", "text": f"document text number {i} " * 20} for i in range(100)}
    train, dev, counts = training_text.training_texts(
        [tmp_path / "q.tsv"], [("corpus:x", corpus, set())], num_dev=5, max_train=200, corpus_share=0.1
    )
    # before: 45 queries + 155 spans (77.5% document text); now the 10% share holds, with fewer texts
    assert counts["queries"] == 45 and counts["corpus:x"] == 5 and len(train) == 50
    assert "keep the share" in caplog.text


def test_codes_of_rescaled_rows_are_refused_though_their_cosines_match(tmp_path, docs):
    """Cosine is blind to scale: an SQ8 index coding rows x3 passes the code comparison, not the norm check."""
    import faiss

    for name, vectors, ok in (("unit", docs, True), ("x3", docs * 3, False)):
        sq = faiss.IndexScalarQuantizer(DIM, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        sq.train(vectors)
        sq.add(vectors)
        (tmp_path / name).mkdir()
        faiss.write_index(sq, str(tmp_path / name / "index"))
        (tmp_path / name / "docid").write_text("\n".join(ids_of()) + "\n")
        if ok:
            assert "codes" in check(given_index.open_index(tmp_path / name), docs)["method"]
        else:
            with pytest.raises(cli.UsageError, match="must code unit vectors"):
                check(given_index.open_index(tmp_path / name), docs)


@pytest.mark.parametrize("factory", ["NSG16,Flat", "IVF8,PQ8,RFlat"])
def test_types_that_reconstruct_their_vectors_are_checked_by_them(tmp_path, docs, factory):
    import faiss

    index = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(docs)
    index.add(docs)
    faiss.write_index(index, str(tmp_path / "index"))
    (tmp_path / "docid").write_text("\n".join(ids_of()) + "\n")
    given = given_index.open_index(tmp_path)
    record = check(given, docs)
    assert given.exact and given.approximate and record["method"] == "cosine of stored to re-encoded vectors"
    assert record["median_cosine"] > 0.9999


def test_score_terms_against_an_index_of_codes_are_refused_before_any_labelling(tiny_bert, tmp_path, capsys, docs):
    import faiss

    import distillation

    sq = faiss.IndexScalarQuantizer(DIM, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    sq.train(docs)
    sq.add(docs)
    faiss.write_index(sq, str(tmp_path / "index"))
    (tmp_path / "docid").write_text("\n".join(ids_of()) + "\n")
    (tmp_path / "q.tsv").write_text("".join(f"{i}\tquery {i}\n" for i in range(40)))
    argv = ["--teacher_model", tiny_bert, "--train_queries", str(tmp_path / "q.tsv"), "--loss", "cosine:1.0,kl:1.0"]
    argv += ["--doc_index", str(tmp_path), "--output_path", str(tmp_path / "out"), "--log_level", "error"]
    with pytest.raises(SystemExit) as e:
        cli.cli(distillation.main, argv)
    assert e.value.code == 2 and "stores codes, not vectors" in capsys.readouterr().err
    assert not (tmp_path / "out" / "labels").exists()
