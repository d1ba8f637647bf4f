"""The deployed query path of an exported student: fast tokenizer -> ONNX Runtime session (or an embedding-bag over
a static table) -> the model's own pooling and normalization, answering `encode_query` as a SentenceTransformer
does, so every script treats an export and a torch model alike."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qdistill.cli import UsageError

EXPORT_FILE = "export.json"


def backend_name(meta: dict) -> str:
    return "numpy static" if meta["variant"] == "static" else f"onnxruntime {meta['variant']}"


class LeanEncoder:
    """The deployed query path of an exported folder: tokenizer -> session or table -> embedding."""

    def __init__(self, folder, meta: dict | None = None, num_threads: int | None = None):
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self.meta = meta or json.loads((self.folder / EXPORT_FILE).read_text())
        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        if self.meta["max_seq_length"]:
            self.tokenizer.enable_truncation(self.meta["max_seq_length"])
        self.prompt = self.meta.get("prompt", "")
        if self.meta["variant"] == "static":
            self.tokenizer.no_padding()
            self.table = np.load(self.folder / "table.npy")
            return
        import onnxruntime as ort

        self.tokenizer.enable_padding(pad_id=self.meta["pad_id"])
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if num_threads:
            opts.intra_op_num_threads = num_threads
        self.session = ort.InferenceSession(str(self.folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.inputs = self.meta["inputs"]

    def tokenize(self, texts):
        # StaticEmbedding tokenizes without [CLS]/[SEP]; transformers with them, as SentenceTransformer does
        static = self.meta["variant"] == "static"
        return self.tokenizer.encode_batch([self.prompt + t for t in texts], add_special_tokens=not static)

    def features(self, texts):
        """What the model reads: token id lists (static) or the session's input arrays."""
        enc = self.tokenize(texts)
        if self.meta["variant"] == "static":
            return [e.ids for e in enc]
        feeds = {
            "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        }
        if "token_type_ids" in self.inputs:
            feeds["token_type_ids"] = np.array([e.type_ids for e in enc], dtype=np.int64)
        return feeds

    def forward(self, features) -> np.ndarray:
        if self.meta["variant"] != "static":
            return self.session.run(None, features)[0]
        # StaticEmbedding: the mean of the tokens' rows (an embedding bag), then its normalization
        emb = np.stack([self.table[ids].mean(0) if ids else np.zeros(self.table.shape[1]) for ids in features])
        emb = emb.astype(np.float32)
        if self.meta["normalize"]:
            emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return emb

    def get_embedding_dimension(self) -> int:
        return self.meta["dim"]

    def encode_query(self, texts, batch_size: int = 64, **_) -> np.ndarray:
        """The query side, called as SentenceTransformer.encode_query is (the prompt is added in tokenize)."""
        return self.encode(list(texts), batch_size)

    def encode_document(self, texts, **_) -> np.ndarray:
        raise UsageError(
            f"{self.folder} is an exported query encoder; documents stay with the teacher's encoder and its index"
        )

    def encode(self, texts, batch_size: int = 64) -> np.ndarray:
        out = [self.forward(self.features(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.meta["dim"]), np.float32)
