"""The teacher's document index where a search team serves it: a Milvus collection, searched where it lives.

`--doc_index milvus:<uri>#<collection>`: the uri is a Milvus server or cluster (`http://host:19530`) or a local
file, which pymilvus opens with Milvus Lite (the Milvus engine embedded in the process; no server). Credentials
come from MILVUS_TOKEN (or MILVUS_USER and MILVUS_PASSWORD) or from the uri itself; they are never written into a
result, a config, a log line or an error (redact). The teacher's and each student's query vectors are sent as
search requests to that collection with the index's own search settings (or --milvus_search_params), so the
ranking compared is the one the user serves; its scores become similarities as every backend's do
(search.to_similarity: an L2 collection returns squared distances, lower is better). Every stored vector is read
once by the check (index_check.scan), which also gives the collection's content digest: results are keyed by the
index type and its parameters, the search parameters and that digest, never by the uri.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np

from qdistill import search as search_lib
from qdistill.cli import UsageError, redact

logger = logging.getLogger(__name__)
PREFIX = "milvus:"
BATCH = 64  # queries per search request; ids per get request are BATCH * 16
SCAN_BATCH = 4096  # rows per page when the ids are listed and when the check reads every vector
MAX_TOP_K = 16_384  # Milvus refuses a search limit above this
REMOTE = ("http://", "https://", "tcp://", "grpc://", "unix:")


def is_milvus(spec) -> bool:
    return str(spec).startswith(PREFIX)


def parse(spec: str) -> tuple[str, str]:
    uri, _, collection = spec[len(PREFIX) :].rpartition("#")
    if not uri or not collection:
        raise UsageError(f"--doc_index {redact(spec)}: write a Milvus collection as milvus:<uri>#<collection>")
    return uri, collection


def client(uri: str):
    """A MilvusClient: a remote uri with the credentials of the environment, or an existing Milvus Lite file (a
    mistyped path would otherwise leave an empty database behind)."""
    try:
        from pymilvus import MilvusClient
    except ImportError as e:
        raise UsageError("a milvus: index needs pymilvus (pip install -r requirements.txt)") from e
    shown = redact(uri)
    if not uri.startswith(REMOTE) and not Path(uri).is_file():
        raise UsageError(f"Milvus Lite database {shown} does not exist; check the path (or give http://host:port)")
    auth = {}
    if os.environ.get("MILVUS_TOKEN"):
        auth["token"] = os.environ["MILVUS_TOKEN"]
    elif os.environ.get("MILVUS_USER"):
        auth.update(user=os.environ["MILVUS_USER"], password=os.environ.get("MILVUS_PASSWORD", ""))
    parts = urlsplit(uri)
    if parts.username and uri.startswith(REMOTE):  # handed over apart: pymilvus logs the uri it is given
        auth.setdefault("user", unquote(parts.username))
        auth.setdefault("password", unquote(parts.password or ""))
        uri = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    try:
        return MilvusClient(uri=uri, **auth)
    except Exception as e:  # noqa: BLE001 - connection errors come in many types
        raise UsageError(
            f"cannot reach Milvus at {shown} ({redact(str(e).splitlines()[0][:120])}); check it"
        ) from None


def search_params(text: str | None) -> dict:
    """--milvus_search_params: a JSON object (e.g. '{"nprobe": 16}' or '{"ef": 64}'); {} = the engine's own."""
    if not text:
        return {}
    try:
        params = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--milvus_search_params {text!r} is not JSON ({e.msg}); e.g. '{{\"nprobe\": 16}}'") from None
    if not isinstance(params, dict):
        raise UsageError(f"--milvus_search_params {text!r} must be a JSON object, e.g. '{{\"nprobe\": 16}}'")
    return params


class MilvusIndex:
    """A Milvus collection seen as a DocIndex. Its ids are listed once, in the engine's primary-key order, and
    the rows that search, rows_of and chunks use index into that list, so the evaluation maps rows to ids as for
    any index."""

    kind, faiss_type, searched_as_built, exact, readable = "milvus", None, True, True, True

    def __init__(self, spec: str, params: dict | None = None):
        uri, self.collection = parse(spec)
        self.client = client(uri)
        self.path = f"milvus collection {self.collection}"
        if not self.client.has_collection(self.collection):
            raise UsageError(f"Milvus at {redact(uri)} has no collection {self.collection!r}; check its name")
        fields = self.client.describe_collection(self.collection)["fields"]
        self.pk = next(f for f in fields if f.get("is_primary"))
        vectors = [f for f in fields if f["type"].name == "FLOAT_VECTOR"]
        if len(vectors) != 1:
            raise UsageError(f"Milvus collection {self.collection} has {len(vectors)} float vector fields; one needed")
        self.field, self.dim = vectors[0]["name"], int(vectors[0]["params"]["dim"])
        self.int_ids = self.pk["type"].name == "INT64"
        indexes = self.client.list_indexes(self.collection, field_name=self.field)
        if not indexes:
            raise UsageError(f"Milvus collection {self.collection} has no index on {self.field}; create one")
        described = self.client.describe_index(self.collection, indexes[0])
        self.metric_name = described["metric_type"]
        self.metric = {"IP": "ip", "COSINE": "cosine", "L2": "l2"}.get(self.metric_name, self.metric_name.lower())
        self.index_type = described.get("index_type", "")
        skip = {"index_type", "metric_type", "field_name", "index_name", "total_rows", "indexed_rows", "state"}
        self.index_params = {k: v for k, v in described.items() if k not in skip and not k.startswith("pending")}
        self.params = dict(params or {})
        self.client.load_collection(self.collection)
        self.ids = [str(r[self.pk["name"]]) for batch in self._pages([]) for r in batch]
        self.count = len(self.ids)
        declared = int(self.client.get_collection_stats(self.collection)["row_count"])
        if declared != self.count:
            raise UsageError(f"{self.path} lists {self.count} ids but declares {declared} rows; is it being written?")
        self._row = {d: i for i, d in enumerate(self.ids)}
        self.verification, self.content = {}, None
        logger.info(
            "Milvus collection %s: %d x %d, %s %s",
            self.collection,
            self.count,
            self.dim,
            self.index_type,
            self.metric_name,
        )

    def __len__(self) -> int:
        return self.count

    @property
    def approximate(self) -> bool:
        return self.index_type.upper() != "FLAT"

    @property
    def label(self) -> str:
        return "flat" if not self.approximate else f"given-milvus-{self.index_type.lower()}"

    def served(self) -> dict:
        return {"index_type": self.index_type, "index_params": self.index_params, "search_params": self.params}

    def _pages(self, fields: list[str]):
        """Pages of records over the whole collection in primary-key order, each page asked for as `pk > last`
        with the last id written as an escaped literal (pymilvus's own query_iterator writes it unescaped, and
        an id with a quote or a trailing backslash then breaks its every request)."""
        last = None
        kwargs = {"iterator": "True", "reduce_stop_for_best": "True"}  # pages in primary-key order
        while True:
            if last is None:
                where = f"{self.pk['name']} >= {-(1 << 63)}" if self.int_ids else f'{self.pk["name"]} >= ""'
            else:
                where = f"{self.pk['name']} > {self._literal(last)}"
            page = self.client.query(
                self.collection, filter=where, output_fields=[self.pk["name"], *fields], limit=SCAN_BATCH, **kwargs
            )
            if not page:
                return
            keys = [r[self.pk["name"]] for r in page]
            if keys != sorted(keys) or (last is not None and keys[0] <= last):
                raise UsageError(f"{self.path}: the engine returned a page out of primary-key order; cannot list it")
            last = keys[-1]
            yield page

    def _literal(self, key) -> str:
        return str(int(key)) if self.int_ids else json.dumps(str(key), ensure_ascii=False)

    def _filter(self, ids: list[str]) -> str:
        """An `in` expression of the ids, each a properly escaped literal (ids with quotes or backslashes work)."""
        if self.int_ids:
            keys = [d for d in ids if re.fullmatch(r"-?\d+", d)]  # a non-numeric id cannot be in an INT64 collection
        else:
            keys = [self._literal(d) for d in ids]
        return f"{self.pk['name']} in [{', '.join(keys)}]"

    def rows_of(self, ids) -> list[int | None]:
        return [self._row.get(str(d)) for d in ids]

    def vectors(self, rows) -> np.ndarray:
        ids = [self.ids[r] for r in rows]
        found = {}
        for start in range(0, len(ids), BATCH * 16):
            part = ids[start : start + BATCH * 16]
            for rec in self.client.query(self.collection, filter=self._filter(part), output_fields=[self.field]):
                found[str(rec[self.pk["name"]])] = rec[self.field]
        missing = [d for d in ids if d not in found]
        if missing:
            raise UsageError(f"{self.path}: id {missing[0]!r} was listed but cannot be read back; is it changing?")
        return np.asarray([found[d] for d in ids], np.float32)

    def chunks(self, rows: int = SCAN_BATCH):
        """(start row, float32 block) over every stored vector, in the listing's order; the content digest (an
        order-free sum of each (id, vector)'s hash) is taken on the way, so an upsert anywhere changes it."""
        total, start = 0, 0
        for page in self._pages([self.field]):
            ids = [str(r[self.pk["name"]]) for r in page]
            if [self._row.get(d) for d in ids] != list(range(start, start + len(ids))):
                raise UsageError(f"{self.path} changed while it was read (rows added or deleted); read it again")
            block = np.asarray([r[self.field] for r in page], np.float32)
            for d, v in zip(ids, block):
                total += int.from_bytes(hashlib.blake2b(d.encode() + b"\0" + v.tobytes(), digest_size=8).digest())
            yield start, block
            start += len(ids)
        self.content = f"{total % (1 << 64):016x}"

    def all_vectors(self):
        raise UsageError("score terms read every stored vector: export the collection to a .npy and use --doc_index")

    def search(self, q: np.ndarray, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, rows) from the collection's own search; rows -1 where fewer than k came back."""
        k = min(k, self.count)
        if k > MAX_TOP_K:
            raise UsageError(
                f"{self.path}: Milvus searches at most {MAX_TOP_K} results a query, {k} asked; lower --k_values"
            )
        scores = np.full((len(q), k), np.inf if self.metric == "l2" else -np.inf, np.float32)
        rows = np.full((len(q), k), -1, np.int64)
        params = {"metric_type": self.metric_name, "params": self.params}
        for start in range(0, len(q), BATCH):
            block = np.asarray(q[start : start + BATCH], np.float32).tolist()
            hits = self.client.search(
                self.collection, data=block, limit=k, anns_field=self.field, search_params=params
            )
            for i, found in enumerate(hits):
                ids = [str(h["id"]) for h in found]
                scores[start + i, : len(ids)] = [h["distance"] for h in found]
                rows[start + i, : len(ids)] = [self._row[d] for d in ids]
        return search_lib.to_similarity(scores, rows, self.metric, self.path), rows

    def content_digest(self) -> str:
        if self.content is None:
            for _ in self.chunks():
                pass
        return self.content

    def id_set_digest(self) -> str:
        from qdistill.given_index import id_set_digest

        return id_set_digest(self.ids)

    @property
    def key(self) -> dict:
        return {
            "kind": "milvus",
            "collection": self.collection,
            "num_docs": self.count,
            "dim": self.dim,
            "metric": self.metric_name,
            **self.served(),
            "content": self.content_digest(),
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]


def write_collection(uri: str, collection: str, embeddings, ids: list[str], normalize: bool, **how):
    """The toolkit's teacher index as a Milvus collection (unit vectors for a cosine teacher), replacing one of the
    same name: how the tests, and a user without one, put an index there. how: metric ('IP', 'COSINE', 'L2'),
    index_type ('FLAT', 'IVF_FLAT', ...), index_params, int_ids (an INT64 primary key)."""
    from pymilvus import DataType, MilvusClient

    c = MilvusClient(uri=uri)
    if c.has_collection(collection):
        c.drop_collection(collection)
    schema = MilvusClient.create_schema(auto_id=False)
    if how.get("int_ids"):
        schema.add_field("id", DataType.INT64, is_primary=True)
    else:
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=max(len(i) for i in ids) + 1)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(embeddings.shape[1]))
    params = c.prepare_index_params()
    params.add_index(
        field_name="vector",
        index_type=how.get("index_type", "FLAT"),
        metric_type=how.get("metric", "IP"),
        params=how.get("index_params", {}),
    )
    c.create_collection(collection, schema=schema, index_params=params)
    for start in range(0, len(ids), 2048):
        block = np.asarray(embeddings[start : start + 2048], np.float32)
        block = search_lib.unit(block) if normalize else block
        keys = [int(d) if how.get("int_ids") else d for d in ids[start : start + 2048]]
        c.insert(collection, [{"id": d, "vector": v.tolist()} for d, v in zip(keys, block)])
    c.flush(collection)
    c.close()
