"""The teacher's document index where a search team serves it: a Milvus collection, searched where it lives.

`--doc_index milvus:<uri>#<collection>`: the uri is a Milvus server or cluster (`http://host:19530`) or a local
file, which pymilvus opens with Milvus Lite (the Milvus engine embedded in the process; no server). The teacher's
and each student's query vectors are sent as search requests to that collection, so the ranking compared is the
one the user serves and the database does the searching, whatever its size; stored vectors are read back only for
the check (index_check.verify), by id. Results are keyed by the collection's name, its row count and the checked
sample (ids and stored vectors), never by the uri.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np

from qdistill.cli import UsageError

logger = logging.getLogger(__name__)
PREFIX = "milvus:"
BATCH = 64  # queries per search request; ids per get request are BATCH * 16


def is_milvus(spec) -> bool:
    return str(spec).startswith(PREFIX)


def parse(spec: str) -> tuple[str, str]:
    uri, _, collection = spec[len(PREFIX) :].rpartition("#")
    if not uri or not collection:
        raise UsageError(f"--doc_index {spec}: write a Milvus collection as milvus:<uri>#<collection>")
    return uri, collection


def client(uri: str):
    try:
        from pymilvus import MilvusClient
    except ImportError as e:
        raise UsageError("a milvus: index needs pymilvus (pip install -r requirements.txt)") from e
    try:
        return MilvusClient(uri=uri)
    except Exception as e:  # noqa: BLE001 - connection errors come in many types
        raise UsageError(f"cannot reach Milvus at {uri} ({str(e).splitlines()[0][:120]}); check the uri") from e


class MilvusIndex:
    """A Milvus collection seen as a DocIndex: `ids` holds the ids met so far (in results and checks), and the rows
    that search and rows_of return index into it, so the evaluation code maps rows to ids as for any index."""

    kind, faiss_type, searched_as_built, exact = "milvus", None, True, True

    def __init__(self, spec: str):
        self.spec = spec
        uri, self.collection = parse(spec)
        self.client = client(uri)
        if not self.client.has_collection(self.collection):
            raise UsageError(f"Milvus at {uri} has no collection {self.collection!r}; check its name")
        info = self.client.describe_collection(self.collection)
        fields = info["fields"]
        self.pk = next(f for f in fields if f.get("is_primary"))
        vectors = [f for f in fields if f["type"].name == "FLOAT_VECTOR"]
        if len(vectors) != 1:
            raise UsageError(f"Milvus collection {self.collection} has {len(vectors)} float vector fields; one needed")
        self.field, self.dim = vectors[0]["name"], int(vectors[0]["params"]["dim"])
        self.int_ids = self.pk["type"].name == "INT64"
        self.client.load_collection(self.collection)
        stats = self.client.get_collection_stats(self.collection)
        self.count = int(stats["row_count"])
        indexes = self.client.list_indexes(self.collection, field_name=self.field)
        if not indexes:
            raise UsageError(f"Milvus collection {self.collection} has no index on {self.field}; create one")
        metric = self.client.describe_index(self.collection, indexes[0])["metric_type"]
        self.metric_name = metric
        self.metric = {"IP": "ip", "COSINE": "cosine", "L2": "l2"}.get(metric, metric.lower())
        self.ids: list[str] = []
        self._row: dict[str, int] = {}
        self.path, self.verification, self.sample_digest = f"milvus collection {self.collection}", {}, None
        logger.info("Milvus collection %s: %d x %d, %s", self.collection, self.count, self.dim, metric)

    def __len__(self) -> int:
        return self.count

    def _rows(self, ids) -> list[int]:
        out = []
        for d in ids:
            if d not in self._row:
                self._row[d] = len(self.ids)
                self.ids.append(d)
            out.append(self._row[d])
        return out

    def _key(self, d: str):
        return int(d) if self.int_ids else d

    def _get(self, ids: list[str], fields: list[str]) -> dict:
        found = {}
        for start in range(0, len(ids), BATCH * 16):
            part = ids[start : start + BATCH * 16]
            try:
                keys = [self._key(d) for d in part]
            except ValueError:  # a non-numeric id cannot be in an INT64 collection
                keys = [self._key(d) for d in part if d.lstrip("-").isdigit()]
            for rec in self.client.get(self.collection, ids=keys, output_fields=fields):
                found[str(rec[self.pk["name"]])] = rec
        return found

    def rows_of(self, ids) -> list[int | None]:
        ids = list(ids)
        found = self._get(ids, [self.pk["name"]])
        return [self._rows([d])[0] if d in found else None for d in ids]

    def vectors(self, rows) -> np.ndarray:
        ids = [self.ids[r] for r in rows]
        found = self._get(ids, [self.field])
        out = np.asarray([found[d][self.field] for d in ids], np.float32)
        h = hashlib.sha256(json.dumps(ids).encode() + out.tobytes())
        self.sample_digest = h.hexdigest()[:16]  # what the check read: part of the results' key
        return out

    def all_vectors(self):
        raise UsageError("score terms read every stored vector: export the collection to a .npy and use --doc_index")

    def search(self, q: np.ndarray, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) from the collection's own search; rows -1 where fewer than k came back."""
        k = min(k, self.count)
        scores = np.full((len(q), k), -np.inf, np.float32)
        rows = np.full((len(q), k), -1, np.int64)
        params = {"metric_type": self.metric_name, "params": {}}
        for start in range(0, len(q), BATCH):
            block = np.asarray(q[start : start + BATCH], np.float32).tolist()
            hits = self.client.search(
                self.collection, data=block, limit=k, anns_field=self.field, search_params=params
            )
            for i, found in enumerate(hits):
                ids = [str(h["id"]) for h in found]
                scores[start + i, : len(ids)] = [h["distance"] for h in found]
                rows[start + i, : len(ids)] = self._rows(ids)
        return scores, rows

    @property
    def key(self) -> dict:
        return {
            "kind": "milvus",
            "collection": self.collection,
            "num_docs": self.count,
            "dim": self.dim,
            "metric": self.metric_name,
            "checked_sample": self.sample_digest,
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]


def write_collection(uri: str, collection: str, embeddings, ids: list[str], normalize: bool, index_type="FLAT"):
    """The toolkit's teacher index as a Milvus collection (string ids, inner product; unit vectors for a cosine
    teacher), replacing one of the same name: how the tests, and a user without one, put an index there."""
    from pymilvus import DataType, MilvusClient

    from qdistill.search import unit

    c = MilvusClient(uri=uri)
    if c.has_collection(collection):
        c.drop_collection(collection)
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=max(len(i) for i in ids) + 1)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(embeddings.shape[1]))
    params = c.prepare_index_params()
    params.add_index(field_name="vector", index_type=index_type, metric_type="IP")
    c.create_collection(collection, schema=schema, index_params=params)
    for start in range(0, len(ids), 2048):
        block = np.asarray(embeddings[start : start + 2048], np.float32)
        block = unit(block) if normalize else block
        c.insert(collection, [{"id": d, "vector": v.tolist()} for d, v in zip(ids[start : start + 2048], block)])
    c.flush(collection)
    c.close()
