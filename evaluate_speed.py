"""Query-encoding latency and throughput of a teacher and its students, measured side by side.

Models are interleaved (A B A B ...) over several rounds so drift hits all alike; each round gives one
speedup per student (reference time / student time), reported as median and range over rounds.

    python3 evaluate_speed.py --models sentence-transformers/all-MiniLM-L6-v2 output/RUN/final \\
        --queries scifact --devices cpu cuda --batch_sizes 1 8 32 128
    python3 evaluate_speed.py --models T S --queries ../shared/data/scifact --quantize none int8 --precision fp32 fp16

The first model is the reference (the teacher). Timed: `encode_query` end to end (tokenization included)
and the model forward alone on pre-tokenized input. Outputs output/speed/<run_name>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import time
from pathlib import Path

import numpy as np

import common
from common import UsageError

logger = logging.getLogger("qdistill.speed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="the reference (teacher) first, then students")
    p.add_argument("--queries", required=True, help="BEIR name/folder (its queries) or a query file")
    p.add_argument("--data_dir", default=common.DATA_DIR)
    p.add_argument("--num_queries", type=int, default=300, help="queries timed per round (seeded sample)")
    p.add_argument(
        "--devices", nargs="+", default=["cpu"], help="cpu and/or cuda; a missing GPU is skipped with a note"
    )
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "fp16", "bf16"], help="fp16/bf16: GPU")
    p.add_argument("--quantize", nargs="+", default=["none"], choices=["none", "int8"], help="int8: dynamic, CPU")
    p.add_argument("--onnx", action="store_true", help="also time sentence-transformers' ONNX Runtime backend")
    p.add_argument("--num_threads", type=int, default=os.cpu_count(), help="CPU threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls per model before timing")
    p.add_argument("--output_path", default="output")
    p.add_argument("--run_name", default="speed")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--log_level", default="info")
    args = p.parse_args(argv)
    if any(b < 1 for b in args.batch_sizes):
        p.error("--batch_sizes must be positive")
    if args.repeats < 1 or args.num_queries < 1:
        p.error("--repeats and --num_queries must be positive")
    return args


def load_query_texts(spec: str, data_dir: str) -> list[str]:
    """Texts of a query file, or the queries of a BEIR dataset (name or folder)."""
    path = Path(spec)
    if path.is_file():
        queries = common.read_queries(path)
    else:
        folder = common.dataset_path(spec, data_dir)
        queries = common.read_queries(folder / "queries.jsonl")
    texts = [t for t in (" ".join(q.split()) for q in queries.values()) if t]
    if not texts:
        raise UsageError(f"no non-empty queries in {spec}; pass a file or dataset with queries")
    return texts


def model_facts(model) -> dict:
    config = getattr(getattr(model[0], "auto_model", None), "config", None)
    layers = getattr(config, "num_hidden_layers", getattr(config, "n_layers", None)) if config else 0
    return {
        "layers": layers,
        "params": int(sum(p.numel() for p in model.parameters())),
        "dim": model.get_embedding_dimension(),
    }


def make_variant(model, path, device: str, precision: str, quantize: str):
    """A deployment variant of a model, or (None, reason) when it does not apply here."""
    import torch

    if quantize == "int8":
        if device != "cpu":
            return None, "dynamic int8 is a CPU variant"
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        # per-channel weight scales: per-tensor int8 drifts to ~0.94 cosine on MiniLM, per-channel stays ~0.98
        return quantize_dynamic(copy.deepcopy(model).cpu(), {torch.nn.Linear: per_channel_dynamic_qconfig}), None
    if precision != "fp32":
        if device == "cpu":
            return None, f"{precision} is timed on GPU only"
        return copy.deepcopy(model).to(device, dtype=torch.float16 if precision == "fp16" else torch.bfloat16), None
    return model.to(device), None


def onnx_variant(path, device: str):
    from sentence_transformers import SentenceTransformer

    try:
        provider = "CUDAExecutionProvider" if device.startswith("cuda") else "CPUExecutionProvider"
        return SentenceTransformer(str(path), backend="onnx", model_kwargs={"provider": provider}), None
    except Exception as e:  # noqa: BLE001 - missing optimum/onnxruntime or an export failure: report, not crash
        return None, f"ONNX Runtime backend unavailable ({str(e).splitlines()[0][:100]})"


def sync(device: str):
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_calls(fn, batches, device: str) -> list[float]:
    """Seconds per call of fn(batch), synchronizing around each call on GPU."""
    out = []
    for b in batches:
        sync(device)
        t0 = time.perf_counter()
        fn(b)
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, q))


def markdown(rows: list[dict]) -> str:
    head = ["model", "layers", "params (M)", "device", "variant", "batch", "mode", "p50 ms", "p90 ms", "q/s",
            "speedup vs teacher", "cos vs fp32"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        sp = r.get("speedup")
        sp_txt = f"{sp['median']:.2f}x ({sp['min']:.2f}-{sp['max']:.2f})" if sp else "-"
        lines.append(
            f"| {r['model']} | {r['layers']} | {r['params'] / 1e6:.1f} | {r['device']} | {r['variant']} | "
            f"{r['batch_size']} | {r['mode']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
            f"{r['queries_per_second']:.0f} | "
            f"{sp_txt} | {r['cosine_vs_fp32']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.start_run(args)  # --devices (several) is handled below, not by --device
    import torch
    from sentence_transformers.util import batch_to_device

    torch.set_num_threads(args.num_threads)  # recorded; torch.utils.benchmark would silently use 1
    texts = load_query_texts(args.queries, args.data_dir)
    rng = np.random.default_rng(args.seed)
    texts = [texts[i] for i in sorted(rng.choice(len(texts), min(args.num_queries, len(texts)), replace=False))]

    notes, devices = [], []
    for d in args.devices:
        if d.startswith("cuda") and not torch.cuda.is_available():
            notes.append(f"{d}: skipped, no CUDA GPU visible")
            logger.warning("no CUDA GPU visible: skipping device %s", d)
        else:
            devices.append(d)

    base, facts = {}, {}
    for name in args.models:
        model, path = common.load_model(name, device="cpu")
        base[name], facts[name] = (model, path), model_facts(model)
    tok = base[args.models[0]][0].tokenizer
    lengths = [len(x) for x in tok(texts, add_special_tokens=True)["input_ids"]]
    token_stats = {
        "count": len(lengths),
        **{f"p{q}": float(np.percentile(lengths, q)) for q in (50, 90, 99)},
        "min": int(min(lengths)),
        "max": int(max(lengths)),
        "mean": float(np.mean(lengths)),
    }
    logger.info("%d queries, tokens: median %.0f, p90 %.0f, max %d", len(texts), token_stats["p50"],
                token_stats["p90"], token_stats["max"])  # fmt: skip

    rows = []
    for device in devices:
        variants = []  # (model name, variant label, model)
        for name in args.models:
            model, path = base[name]
            reference = model.to(device)
            ref_emb = reference.encode_query(texts, batch_size=64, convert_to_numpy=True)
            wanted = [(p, q) for p in args.precision for q in args.quantize]
            for precision, quantize in wanted:
                label = precision if quantize == "none" else f"{quantize}"
                if quantize != "none" and precision != "fp32":
                    continue
                m, why = make_variant(model, path, device, precision, quantize)
                if m is None:
                    notes.append(f"{name} {label} on {device}: {why}")
                    continue
                variants.append((name, label, m, ref_emb))
            if args.onnx:
                m, why = onnx_variant(path, device)
                if m is None:
                    notes.append(f"{name} onnx on {device}: {why}")
                else:
                    variants.append((name, "onnx", m, ref_emb))

        for bs in args.batch_sizes:
            batches = [texts[i : i + bs] for i in range(0, len(texts), bs)]
            for mode in ("end_to_end", "forward"):
                times = {(n, v): [] for n, v, _, _ in variants}  # per round: list of per-call seconds
                prepared = {}
                for n, v, m, _ in variants:
                    if mode == "end_to_end":
                        fn = lambda b, m=m: m.encode_query(b, batch_size=len(b), convert_to_numpy=True)  # noqa: E731
                        inputs = batches
                    else:  # pre-tokenized: only the network
                        prompt = m.prompts.get("query") or None  # the same prompt encode_query prepends
                        inputs = [batch_to_device(m.preprocess(b, prompt=prompt), m.device) for b in batches]

                        def fn(f, m=m):
                            with torch.inference_mode():
                                m(f)

                    prepared[(n, v)] = (fn, inputs)
                    with torch.inference_mode():
                        time_calls(fn, (inputs * args.warmup)[: max(args.warmup, 1)], device)
                for _ in range(args.repeats):
                    for key, (fn, inputs) in prepared.items():  # interleaved: A B A B ...
                        with torch.inference_mode():
                            times[key].append(time_calls(fn, inputs, device))
                ref_key = (args.models[0], "fp32")
                for n, v, m, ref_emb in variants:
                    per_round = times[(n, v)]
                    flat = [t for r in per_round for t in r]
                    row = {
                        "model": n,
                        **facts[n],
                        "device": device,
                        "variant": v,
                        "batch_size": bs,
                        "mode": mode,
                        "p50_ms": pct(flat, 50),
                        "p90_ms": pct(flat, 90),
                        "p99_ms": pct(flat, 99),
                        "mean_ms": float(np.mean(flat) * 1000),
                        "queries_per_second": len(texts) * len(per_round) / sum(flat),
                        "calls": len(flat),
                    }
                    if ref_key in times and (n, v) != ref_key:
                        # one ratio per interleaved round: reference total / variant total
                        ratios = [sum(a) / sum(b) for a, b in zip(times[ref_key], per_round)]
                        row["speedup"] = {"median": float(np.median(ratios)), "min": float(min(ratios)),
                                          "max": float(max(ratios)), "per_round": ratios}  # fmt: skip
                    emb = m.encode_query(texts, batch_size=64, convert_to_numpy=True).astype(np.float32)
                    cos = (emb * ref_emb).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref_emb, axis=1))
                    row["cosine_vs_fp32"] = float(np.mean(cos))
                    rows.append(row)
                    logger.info(
                        "%s %s %s b=%d %s: p50 %.2f ms, %.0f q/s%s", n, device, v, bs, mode, row["p50_ms"],
                        row["queries_per_second"],
                        f", speedup {row['speedup']['median']:.2f}x" if "speedup" in row else "",
                    )  # fmt: skip
        for n, _ in base.items():
            with contextlib.suppress(Exception):
                base[n][0].to("cpu")

    result = {
        "config": common.run_info(args),
        "num_threads": args.num_threads,
        "token_lengths": token_stats,
        "notes": notes,
        "results": rows,
    }
    out = Path(args.output_path) / "speed"
    common.write_json(out / f"{args.run_name}.json", result)
    table = markdown(rows) + "".join(f"\nnote: {n}" for n in notes)
    common.write_text(out / f"{args.run_name}.md", table + "\n")
    print(table)
    return result


if __name__ == "__main__":
    common.cli(main)
