"""Serving a student the way it is deployed: ONNX Runtime (fp32, int8) and a lean query path.

    # writes output/onnx/<model>-<fingerprint>-<tag>/{fp32,int8}/ (the path is printed); --output_path DIR instead
    python serving.py --model output/RUN/final --queries scifact --output_path output/RUN/onnx
    python evaluate_retrieval.py --teacher_model T --models output/RUN/onnx/int8 --datasets scifact
    python evaluate_speed.py --models T output/RUN/final --queries scifact --backend torch onnx --quantize none int8
    python evaluate_speed.py --models T output/RUN/onnx/int8 --queries scifact      # an exported folder, as it is

`export(model_path, out)` writes out/fp32/ and out/int8/ (transformer students) or out/static/ (static
students): the graph or table, the fast tokenizer, and export.json with the settings and the fidelity check
(cosine to the torch model on real queries). `LeanEncoder(folder).encode(texts)` is the query path: fast
tokenizer -> ONNX Runtime session (or an embedding-bag over the table) -> the model's own pooling and
normalization, without SentenceTransformer.encode's per-call overhead; it answers `encode_query` as a
SentenceTransformer does, so every script treats an export and a torch model alike.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qdistill import cli, data, encoders
from qdistill.cli import UsageError
from qdistill.lean import backend_name
from qdistill.onnx_export import MIN_COSINE, export, export_folder, is_export


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("--model", required=True, help="a saved student (output/RUN/final) or any SentenceTransformer folder")
    add("--queries", required=True, help="real queries for the fidelity check: BEIR name/folder or file")
    add("--output_path", default=None, help="the export folder (default: output/onnx/<model>-<fingerprint>-<tag>)")
    add("--no_int8", action="store_true", help="skip the int8 variant")
    add(
        "--overwrite_output_dir",
        action="store_true",
        help="accepted for symmetry: an export always replaces its folder",
    )
    add("--num_threads", type=cli.positive_int, default=None, help="CPU threads (default: ONNX Runtime's)")
    add("--accept_low_fidelity", action="store_true", help=f"keep an export below cosine {MIN_COSINE['fp32']}")
    add("--data_dir", default=cli.DATA_DIR)
    add("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if is_export(args.model):
        raise UsageError(f"{args.model} is already an ONNX export; pass the torch model it came from (a final/)")
    path = encoders.resolve_model_path(args.model, args.data_dir)  # a bad path fails before anything is written
    out = Path(args.output_path or export_folder(args.model, path, "output"))
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_path {out} is a file; pass a folder (the export writes fp32/ and int8/ in it)")
    cli.start_run(args.log_level, 42, out.parent)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    texts = data.query_texts(args.queries, args.data_dir)[:500]
    written = export(args.model, out, texts, not args.no_int8, args.num_threads, args.accept_low_fidelity)
    for variant, meta in written.items():
        print(f"{out / variant}: {backend_name(meta)}, cosine to the torch model {meta['cosine_to_torch']:.4f}")
    return written


if __name__ == "__main__":
    cli.cli(main)
