"""The teacher's document index as the user already has it, used where it is: no document is re-encoded.

Two forms are read: a faiss index file with its document ids (pyserini's prebuilt dense indexes are a folder
holding `index` and `docid`; DPR and tevatron write the same kind), and an embeddings `.npy` (float32 or
float16, any size) with an ids file (one id a line, or a JSON list). Before anything is searched, `verify`
encodes a seeded sample of documents with the teacher exactly as its index would (document prompt, max length)
and compares them with the stored vectors, so an index made by another model or prompt is refused in one line.

A `.npy` is never loaded whole: exact search reads it in chunks with plain file reads (not a memory map, whose
touched pages would count towards the process's resident memory), so memory stays at one chunk whatever the
corpus size. A faiss file is read by faiss and searched with its own index type and settings, as it was built.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qdistill import cli, run_files, search
from qdistill.cli import UsageError

logger = logging.getLogger(__name__)

PYSERINI_INDEX, PYSERINI_DOCID = "index", "docid"  # pyserini's dense index folder: the faiss file, one id a line
CHUNK_ROWS = 131_072  # rows per read in exact search (a multiple of faiss's 1,024-row blocks)
# faiss index types searched exhaustively over their float32 vectors: what exact search gives. Every other type is
# approximate (graph, inverted lists or codes) and evaluated as served, with its own search settings.
EXACT_SEARCH = {"IndexFlat", "IndexFlatIP", "IndexFlatL2"}
# faiss index types whose reconstructed rows are the float32 originals: checked by cosine to fresh teacher vectors;
# other types store codes, checked through their codec (index_check)
STORES_VECTORS = EXACT_SEARCH | {"IndexHNSWFlat", "IndexIVFFlat", "IndexNSGFlat", "IndexRefineFlat"}
_DIGESTS: dict = {}


def file_sha256(path: Path) -> str:
    """sha256 of the whole file (never a part: a changed vector in the middle must change the key), memoized per
    (path, size, mtime) within the process."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
        _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


@dataclass
class DocIndex:
    """Document vectors with their ids, row i = ids[i]."""

    path: Path  # the vectors: a .npy or a faiss file
    ids: Sequence[str]  # an IdList for files read here
    dim: int
    kind: str  # "npy" or "faiss"
    faiss_type: str | None = None
    metric: str = "ip"  # "ip" or "l2" (faiss); a .npy is scored with the teacher's own function
    dtype: str = "float32"
    offset: int = 0  # .npy: where the rows start in the file
    index: object = None  # faiss: the index as read
    key: dict = field(default_factory=dict)
    verification: dict = field(default_factory=dict)  # what verify() found

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def exact(self) -> bool:
        """Whether the stored vectors are the originals (flat, HNSW-flat, IVF-flat, NSG-flat, .npy), not codes."""
        return self.kind == "npy" or self.faiss_type.split("+")[0] in STORES_VECTORS

    @property
    def approximate(self) -> bool:
        """Whether its search is approximate (graph, inverted lists, codes): its numbers are the served ones."""
        return self.kind == "faiss" and self.faiss_type not in EXACT_SEARCH

    @property
    def label(self) -> str:
        """How results over it are filed and tabled: 'flat' (exact), else 'given-<type>' (faiss's type name)."""
        if not self.approximate:
            return "flat"
        return "given-" + "-".join(t.removeprefix("Index").lower() for t in self.faiss_type.split("+"))

    @property
    def readable(self) -> bool:
        """Whether its rows can be read back as vectors (originals, or decoded codes)."""
        if self.kind != "faiss":
            return True
        try:
            self.index.reconstruct(0)
        except RuntimeError:
            return False
        return True

    def served(self) -> dict:
        """The search settings it is served with, as stored in the file (faiss keeps efSearch, nprobe, search_L)."""
        return faiss_search_settings(self.index) if self.kind == "faiss" else {}

    def id_set_digest(self) -> str:
        """The set of its ids, whatever their order or the form holding them (in-domain marks compare these)."""
        return id_set_digest(self.ids)

    @property
    def searched_as_built(self) -> bool:
        """A faiss file is searched with its own index; a .npy by exact search (or an index built from it)."""
        return self.kind == "faiss"

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]

    def rows_of(self, ids) -> list[int | None]:
        """The rows of the given ids (None where absent), by one scan: no map of every id is kept (8.8M ids in a
        dict would cost about a GB)."""
        wanted = {str(d).encode("utf-8") for d in ids}
        raw = self.ids.raw() if isinstance(self.ids, IdList) else (str(d).encode("utf-8") for d in self.ids)
        found = {d.decode("utf-8"): i for i, d in enumerate(raw) if d in wanted}
        return [found.get(d) for d in ids]

    def chunks(self, rows: int = CHUNK_ROWS):
        """(start row, float32 block) over the whole index, one block in memory at a time."""
        if self.kind == "faiss":
            for start in range(0, len(self), rows):
                yield start, self.index.reconstruct_n(start, min(rows, len(self) - start))
            return
        itemsize = np.dtype(self.dtype).itemsize
        with open(self.path, "rb") as f:
            for start in range(0, len(self), rows):
                n = min(rows, len(self) - start)
                f.seek(self.offset + start * self.dim * itemsize)
                block = np.fromfile(f, self.dtype, n * self.dim).reshape(n, self.dim)
                yield start, block.astype(np.float32, copy=False)

    def vectors(self, rows) -> np.ndarray:
        """float32 stored vectors of the given rows (exact for exact indexes, decoded codes otherwise)."""
        rows = np.asarray(rows, np.int64)
        if self.kind == "faiss":
            return self.index.reconstruct_batch(rows)
        arr = np.load(self.path, mmap_mode="r")  # a few rows: the map touches only their pages
        return np.asarray(arr[rows], np.float32)

    def all_vectors(self) -> np.ndarray:
        """Every vector in memory (score terms keep them): only for exact indexes."""
        require_vectors(self)
        out = np.empty((len(self), self.dim), np.float32)
        for start, block in self.chunks():
            out[start : start + len(block)] = block
        return out

    def search(self, q: np.ndarray, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, rows) of each query's top k: a faiss file with its own search and settings, a .npy
        exactly in chunks (normalize: unit document vectors first, for cosine teachers). Rows are -1 where fewer
        than k exist."""
        if self.kind == "faiss":
            scores, rows = search.search(self.index, q, k)
            return search.to_similarity(scores, rows, self.metric, f"index at {self.path}"), rows
        return search.exact_search(q, self.chunks(), min(k, len(self)), normalize)


def require_vectors(index) -> None:
    """Score terms keep every stored vector in memory: an index of codes, or a Milvus collection, cannot serve
    them. Checked when the index is opened, before the teacher labels anything."""
    if index.kind == "milvus":
        raise UsageError(
            f"{index.path}: score terms read every stored vector; export the collection to a .npy + ids and pass "
            "that as --doc_index"
        )
    if not index.exact:
        raise UsageError(
            f"{index.path} is a {index.faiss_type} index, which stores codes, not vectors; score terms need the "
            "vectors themselves: pass a flat faiss index or the embeddings .npy with --doc_ids"
        )


# ----------------------------------------------------------------------------- opening


class IdList(Sequence):
    """Document ids kept as their UTF-8 bytes and line offsets: 8.8M ids cost ~300 MB here, not the ~1.3 GB of
    8.8M Python strings. ids[i] decodes one id; iteration decodes them one at a time."""

    def __init__(self, data: bytes):
        self.data = data if data.endswith(b"\n") else data + b"\n"
        self.ends = np.flatnonzero(np.frombuffer(self.data, np.uint8) == ord("\n"))
        self.starts = np.concatenate([[0], self.ends[:-1] + 1])
        self.sha256 = hashlib.sha256(self.data).hexdigest()

    @classmethod
    def from_list(cls, ids) -> IdList:
        return cls("".join(f"{i}\n" for i in ids).encode("utf-8"))

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.data[self.starts[i] : self.ends[i]].decode("utf-8")

    def raw(self):
        """Each id's bytes, in order."""
        data = self.data
        return (data[a:b] for a, b in zip(self.starts.tolist(), self.ends.tolist()))

    def first_duplicate(self) -> str | None:
        """An id that appears twice, found through sorted 64-bit hashes (no set of every id)."""
        hashes = np.fromiter((hash(x) for x in self.raw()), np.int64, len(self))
        order = np.argsort(hashes, kind="stable")
        same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
        for j in same:  # a shared hash is a duplicate only when the bytes agree too
            a, b = order[j], order[j + 1]
            if self[int(a)] == self[int(b)]:
                return self[int(a)]
        return None


def id_set_digest(ids) -> str:
    """sha256 of the sorted, distinct ids: the same for a pyserini folder, a .npy + ids, a Milvus collection or
    a BEIR corpus holding the same documents."""
    raw = ids.raw() if isinstance(ids, IdList) else (str(d).encode("utf-8") for d in ids)
    h = hashlib.sha256()
    for d in sorted(set(raw)):
        h.update(d + b"\n")
    return h.hexdigest()[:16]


def faiss_search_settings(index) -> dict:
    """The search-time settings a faiss index carries (they travel in the file): efSearch, nprobe, search_L."""
    import faiss

    out = {}
    for part in _faiss_parts(index):
        if isinstance(part, faiss.IndexHNSW):
            out["efSearch"] = int(part.hnsw.efSearch)
        if isinstance(part, faiss.IndexIVF):
            out["nprobe"] = int(part.nprobe)
        if isinstance(part, faiss.IndexNSG):
            out["search_L"] = int(part.nsg.search_L)
    return out


def _faiss_parts(index):
    """The index and the ones it wraps (PreTransform's index, Refine's base), each as its own faiss type."""
    import faiss

    for _ in range(8):  # a chain that deep is not an index anyone serves
        yield index
        inner = index.base_index if isinstance(index, faiss.IndexRefine) else getattr(index, "index", None)
        if not isinstance(index, (faiss.IndexPreTransform, faiss.IndexRefine)) or inner is None:
            return
        index = faiss.downcast_index(inner)


def read_ids(path: Path) -> IdList:
    """Document ids: a JSON list (.json) or one id a line, each checked (UTF-8, non-empty, unique)."""
    path = cli.check_file(path, "document id file", "pass the index's docid list (one id a line, or .json)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"document id file {path} is not UTF-8 text ({e.reason}); convert it to UTF-8") from e
    if path.suffix == ".json":
        try:
            listed = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"document id file {path} is not valid JSON ({e.msg}, line {e.lineno})") from e
        if not isinstance(listed, list):
            raise UsageError(f"document id file {path} must hold a JSON list of ids")
        odd = next((i for i in listed if isinstance(i, bool) or not isinstance(i, (str, int))), "none")
        if odd != "none":
            raise UsageError(f"document id file {path}: id {odd!r} is not a string or an integer; write each id")
        if any("\n" in str(i) for i in listed):
            raise UsageError(f"document id file {path}: an id holds a line break; ids must be one line each")
        ids = IdList.from_list(str(i) for i in listed) if listed else None
    else:
        del text
        ids = IdList(data.replace(b"\r\n", b"\n")) if data.strip() else None
    if ids is None:
        raise UsageError(f"document id file {path} is empty")
    empty = np.flatnonzero(ids.ends == ids.starts)
    if len(empty):
        raise UsageError(f"document id file {path}: line {empty[0] + 1} is empty; one id a line, none blank")
    dup = ids.first_duplicate()
    if dup is not None:
        raise UsageError(f"document id file {path}: id {dup!r} appears more than once; ids must be unique")
    return ids


def resolve(spec: str | Path, ids_path: str | Path | None = None) -> tuple[Path, Path]:
    """(vectors file, ids file) of a --doc_index: a pyserini folder, or a faiss/.npy file with --doc_ids."""
    spec = Path(spec)
    if spec.is_dir():
        vectors, ids = spec / PYSERINI_INDEX, spec / PYSERINI_DOCID
        if not vectors.is_file() or not ids.is_file():
            raise UsageError(
                f"--doc_index {spec} is a folder but not in pyserini's layout ({PYSERINI_INDEX} + {PYSERINI_DOCID}); "
                "pass that folder, or a faiss/.npy file with --doc_ids"
            )
        return vectors, Path(ids_path) if ids_path else ids
    cli.check_file(spec, "--doc_index", "pass a pyserini index folder, or a faiss/.npy file with --doc_ids")
    if not ids_path:
        raise UsageError(f"--doc_index {spec} is a file: pass its document ids with --doc_ids (one id a line)")
    return spec, Path(ids_path)


def open_index(spec: str | Path, ids_path: str | Path | None = None, milvus_params: dict | None = None) -> DocIndex:
    """A DocIndex read and checked for shape: the vectors' count equals the ids', the file is whole; or a Milvus
    collection (`milvus:<uri>#<collection>`, milvus.py), searched where it lives with milvus_params."""
    from qdistill import milvus

    if milvus.is_milvus(spec):
        if ids_path:
            raise UsageError(
                f"--doc_index {cli.redact(str(spec))}: a Milvus collection holds its own ids; drop --doc_ids for it"
            )
        return milvus.MilvusIndex(str(spec), milvus_params)
    vectors, ids_file = resolve(spec, ids_path)
    ids = read_ids(ids_file)
    index = open_npy(vectors, ids) if vectors.suffix == ".npy" else _open_faiss(vectors, ids)
    if index.dim < 1:
        raise UsageError(f"index {vectors} holds {index.dim}-d vectors; expected embeddings")
    index.key = {
        "kind": index.kind,
        "faiss_type": index.faiss_type,
        "metric": index.metric,
        "dtype": index.dtype,
        "num_docs": len(ids),
        "dim": index.dim,
        "vectors_sha256": file_sha256(vectors),
        "ids_sha256": ids.sha256,
    }
    logger.info("document index %s: %d x %d (%s)", vectors, len(ids), index.dim, index.faiss_type or index.dtype)
    return index


def open_npy(path: Path, ids: list[str]) -> DocIndex:
    """Rows of a .npy with their ids, checked (2-d float32/float16, whole); nothing is read but the header. The
    index this toolkit builds (teacher_outputs.teacher_index) is opened this way too, and searched like a given one."""
    cli.check_file(path, "embeddings", "pass an existing .npy file")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError) as e:
        raise UsageError(f"embeddings {path} is not a readable .npy file ({e}); write it with numpy.save") from e
    if len(shape) != 2 or fortran or dtype not in (np.float32, np.float16):
        raise UsageError(
            f"embeddings {path}: expected a 2-d C-order float32/float16 array, found shape {shape}, dtype {dtype}"
            f"{', Fortran order' if fortran else ''}"
        )
    size = path.stat().st_size
    if size != offset + shape[0] * shape[1] * dtype.itemsize:
        raise UsageError(
            f"embeddings {path} is truncated or padded: {size} bytes for a {shape[0]} x {shape[1]} {dtype} array; "
            "write it again"
        )
    _same_count(path, shape[0], ids)
    return DocIndex(path, ids, int(shape[1]), "npy", dtype=str(dtype), offset=offset)


def _open_faiss(path: Path, ids: list[str]) -> DocIndex:
    import faiss

    index = read_faiss(path)
    parts = list(_faiss_parts(index))
    kind = "+".join(type(p).__name__ for p in parts) if len(parts) > 1 else type(index).__name__
    if any("IDMap" in type(p).__name__ for p in parts):
        raise UsageError(f"faiss index {path} is an {kind}: write its ids in order to a docid file instead")
    _same_count(path, index.ntotal, ids)
    ivf = next((p for p in parts if isinstance(p, faiss.IndexIVF)), None)
    if ivf is not None:
        try:  # reconstructing a stored vector by row needs the row -> list map, and rows 0..n-1
            ivf.make_direct_map()
        except RuntimeError:
            raise UsageError(
                f"faiss index {path} is an {kind} whose stored ids are not its rows 0..{index.ntotal - 1} (added "
                "with add_with_ids?); write the ids in row order to a docid file and rebuild it with add()"
            ) from None
    metric = {faiss.METRIC_INNER_PRODUCT: "ip", faiss.METRIC_L2: "l2"}.get(index.metric_type, str(index.metric_type))
    return DocIndex(path, ids, int(index.d), "faiss", faiss_type=kind, metric=metric, index=index)


def read_faiss(path: Path):
    """faiss.read_index under a memory ceiling: a damaged or hostile header that claims terabytes gives one line,
    never an out-of-memory kill (the ceiling: what the process maps now, plus three times the file, plus 2 GiB)."""
    import faiss

    try:
        with _memory_ceiling(3 * path.stat().st_size + (2 << 30)):
            return faiss.read_index(str(path))  # already its own type (downcast_index would leave it unowned)
    except MemoryError:
        raise UsageError(
            f"faiss index {path} claims more memory than its {path.stat().st_size:,} bytes can hold; is it damaged?"
        ) from None
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1][:160] if str(e).strip() else "unreadable"
        raise UsageError(f"faiss index {path} cannot be read ({reason}); is it whole, and a faiss index?") from None


@contextlib.contextmanager
def _memory_ceiling(extra: int):
    """RLIMIT_AS lowered to the current mapping + extra bytes for the block (Linux); restored after."""
    try:
        import resource

        size = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmSize:"))
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, StopIteration):
        yield
        return
    limit = size + extra if hard == resource.RLIM_INFINITY else min(size + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _same_count(path: Path, n: int, ids: list[str]) -> None:
    if n != len(ids):
        raise UsageError(f"index {path} holds {n} vectors but its id file lists {len(ids)} ids; they must match")


# ----------------------------------------------------------------------------- checking against the teacher


# ----------------------------------------------------------------------------- writing the toolkit's own


EXPORT_MARKER = ".qdistill-export.json"  # what marks a folder as this toolkit's own export (replaceable)


def check_export_folder(folder: Path, digest: str | None = None) -> None:
    """A folder --export_index may write: absent, empty, or an earlier export by this toolkit (of the same index
    when digest is given). Anything else is the user's and is never replaced."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise UsageError(f"--export_index: {folder} is a file; move it, or give another --export_index folder")
    if not any(folder.iterdir()):
        return
    marker = folder / EXPORT_MARKER
    if not marker.is_file():
        raise UsageError(
            f"--export_index: {folder} holds files this toolkit did not write; empty it or give another folder"
        )
    try:
        earlier = json.loads(marker.read_text()).get("index")
    except (ValueError, AttributeError):
        earlier = None
    if digest is not None and earlier != digest:
        raise UsageError(
            f"--export_index: {folder} holds the export of another index ({earlier}, this one is {digest}); "
            "give another folder, or remove that export first"
        )


def export_pyserini(folder: Path, embeddings: np.ndarray, ids, normalize: bool, digest: str) -> Path:
    """write_pyserini into a folder that is free or holds an earlier export of the same index, with the marker."""
    check_export_folder(folder, digest)
    return write_pyserini(folder, embeddings, ids, normalize, marker={"index": digest})


def write_pyserini(folder: Path, embeddings: np.ndarray, ids: list[str], normalize: bool, marker=None) -> Path:
    """The toolkit's teacher index in pyserini's layout (a flat inner-product faiss `index` + `docid`), written
    atomically, chunk by chunk; unit vectors for a cosine teacher, as they are searched."""
    import faiss

    with run_files.atomic_dir(folder) as tmp:
        index = search.build_faiss(embeddings, "flat", normalize=normalize, gpu=False)
        faiss.write_index(index, str(tmp / PYSERINI_INDEX))
        (tmp / PYSERINI_DOCID).write_text("".join(f"{d}\n" for d in ids), encoding="utf-8")
        if marker is not None:
            (tmp / EXPORT_MARKER).write_text(json.dumps(marker))
    return folder
