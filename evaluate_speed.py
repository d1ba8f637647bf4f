"""Query-encoding latency and throughput of a teacher and its students, measured side by side.

Models are interleaved (A B A B ...) over several rounds so drift hits all alike; each round gives one
speedup per variant (reference time / variant time), reported as median and range over rounds.

    python evaluate_speed.py --models sentence-transformers/all-MiniLM-L6-v2 output/RUN/final \\
        --queries scifact --devices cpu cuda --batch_sizes 1 8 32 128
    python evaluate_speed.py --models T S --queries $DATA_DIR/scifact --quantize none int8 --precision fp32 fp16
    # a teacher that cannot run here (an embedding API, an LLM embedder): its batch-1 latency as you measured it
    python evaluate_speed.py --models output/RUN/final --queries $DATA_DIR/scifact --teacher_latency_ms 180

The first model is the reference (the teacher), unless --teacher_latency_ms gives the teacher's latency as a
number (labelled as given, never as measured here): then every model is a student, compared with that number.
Timed: end to end (tokenization included) and the model forward alone on pre-tokenized input, for torch
(`encode_query`) and for the ONNX Runtime export through the lean query path (`--backend onnx`; exports are
cached under output/onnx/). Each speedup is given twice: against the teacher on the same backend and precision,
and against the teacher as users run it today (torch fp32 `encode_query`). Outputs output/speed/<run_name>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import time
from pathlib import Path

import numpy as np

from qdistill import cli, data, encoders, lean, onnx_export, run_files, students
from qdistill.cli import UsageError, positive_int
from qdistill.search import cosine_rows

logger = logging.getLogger("qdistill.speed")
# torch.ao's dynamic int8 is deprecated in torch 2.13, but torchao's replacement (Int8DynamicActivationInt8Weight)
# measured 11.8 ms vs 4.5 ms per MiniLM query here (fp32: 6.1 ms): torch is pinned and the old API kept.
INT8_NOTE = "int8 = torch.ao dynamic per-channel quantization (deprecated API, kept: faster than torchao on CPU)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("--models", nargs="+", required=True, help="the reference (teacher) first, then students")
    add(
        "--teacher_latency_ms",
        type=cli.positive,
        default=None,
        help="a teacher that cannot run here: its per-query latency at batch 1 as you measured it (an API's\n"
        "round trip, an LLM embedder's); every --models entry is then a student timed against it",
    )
    add("--queries", required=True, help="BEIR name/folder (its queries) or a query file")
    add("--data_dir", default=cli.DATA_DIR)
    add("--num_queries", type=positive_int, default=300, help="queries timed per round (seeded sample)")
    add(
        "--device",
        "--devices",
        dest="devices",
        nargs="+",
        default=["cpu"],
        help="cpu and/or cuda; a missing GPU is skipped with a note",
    )
    add("--batch_sizes", type=positive_int, nargs="+", default=[1, 32])
    add("--precision", nargs="+", default=["fp32"], choices=["fp32", "fp16", "bf16"], help="fp16/bf16: GPU")
    add("--quantize", nargs="+", default=["none"], choices=["none", "int8"], help="int8: dynamic, CPU")
    add(
        "--backend",
        nargs="+",
        default=["torch"],
        choices=["torch", "onnx"],
        help="torch: SentenceTransformer.encode_query; onnx: the exported model through the lean query path (CPU)",
    )
    add("--num_threads", type=positive_int, default=os.cpu_count(), help="CPU threads (default: all cores)")
    add("--repeats", type=positive_int, default=5, help="interleaved rounds")
    add("--warmup", type=int, default=10, help="untimed calls per model before timing")
    add("--output_path", default="output")
    add("--run_name", default="speed")
    add("--seed", type=int, default=42)
    add("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def plan_variants(devices, precisions, quantize, cuda: bool) -> tuple[list[tuple[str, str]], list[str]]:
    """(device, variant) pairs that apply on this machine, and a note for each one skipped."""
    plan, notes = [], []
    for device in devices:
        if device.startswith("cuda") and not cuda:
            notes.append(f"{device}: skipped, no CUDA GPU visible")
            continue
        for variant in [*precisions, *(q for q in quantize if q != "none")]:
            if variant in ("fp16", "bf16") and device == "cpu":
                notes.append(f"{variant} on cpu: skipped, timed on GPU only")
            elif variant == "int8" and device != "cpu":
                notes.append(f"int8 on {device}: skipped, dynamic int8 is a CPU variant")
            else:
                plan.append((device, variant))
    return plan, notes


def make_variant(model, device: str, variant: str):
    import torch

    if variant == "int8":
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        # per-channel weight scales: per-tensor int8 drifts to ~0.94 cosine on MiniLM, per-channel stays ~0.98
        return quantize_dynamic(copy.deepcopy(model).cpu(), {torch.nn.Linear: per_channel_dynamic_qconfig})
    if variant in ("fp16", "bf16"):
        return copy.deepcopy(model).to(device, dtype=torch.float16 if variant == "fp16" else torch.bfloat16)
    return copy.deepcopy(model).to(device)


def time_calls(fn, inputs, device: str) -> list[float]:
    """Seconds per call of fn(x), synchronizing around each call on GPU."""
    import torch

    # the device timed, not the current one: cuda:1's kernels are waited for on cuda:1
    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    out = []
    with torch.inference_mode():
        for x in inputs:
            sync()
            t0 = time.perf_counter()
            fn(x)
            sync()
            out.append(time.perf_counter() - t0)
    return out


def callable_for(model, batches, mode: str):
    """(fn, inputs) timed for one mode: end to end from texts, or the forward on pre-tokenized batches."""
    from sentence_transformers.util import batch_to_device

    if isinstance(model, Floor):  # the tokenizer alone: the floor of any query path
        return model.encoder.tokenize, batches
    if mode == "end_to_end":  # a SentenceTransformer and an export alike
        return (lambda b: model.encode_query(b, batch_size=len(b))), batches
    if isinstance(model, lean.LeanEncoder):
        return model.forward, [model.features(b) for b in batches]
    prompt = encoders.input_prompt(model, "query") or None  # the same prompt encode_query prepends
    return model, [batch_to_device(model.preprocess(b, prompt=prompt), model.device) for b in batches]


class Floor:
    """Marks the tokenizer-only timing of an exported model."""

    def __init__(self, encoder):
        self.encoder = encoder


def measure(variants, texts, batch_size, mode, device, repeats, warmup) -> dict:
    """{(model, variant): [per-call seconds of each round]}, the variants interleaved round by round."""
    batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    prepared = {key: callable_for(m, batches, mode) for key, (m, _) in variants.items()}
    for fn, inputs in prepared.values():
        time_calls(fn, (inputs * warmup)[:warmup], device)
    times = {key: [] for key in prepared}
    for _ in range(repeats):
        for key, (fn, inputs) in prepared.items():  # interleaved: A B A B ...
            times[key].append(time_calls(fn, inputs, device))
    return times


def summarize(per_round, references: dict, n_texts) -> dict:
    """Latency percentiles and, per reference (name -> per-round times), one speedup per interleaved round."""
    flat = np.asarray([t for r in per_round for t in r]) * 1000
    row = {
        "p50_ms": float(np.percentile(flat, 50)),
        "p90_ms": float(np.percentile(flat, 90)),
        "p99_ms": float(np.percentile(flat, 99)),
        "mean_ms": float(flat.mean()),
        "calls": len(flat),
        "queries_per_second": n_texts * len(per_round) / (flat.sum() / 1000),
    }
    for field, ref in references.items():
        ratios = [sum(a) / sum(b) for a, b in zip(ref, per_round)]  # reference total / this variant's total
        row[field] = {"median": float(np.median(ratios)), "min": min(ratios), "max": max(ratios), "per_round": ratios}
    return row


def markdown(rows: list[dict], notes: list[str]) -> str:
    head = [
        "model",
        "layers",
        "params (M)",
        "device",
        "backend",
        "variant",
        "batch",
        "mode",
        "p50 ms",
        "p90 ms",
        "q/s",
        "speedup vs teacher, same backend",
        "speedup vs teacher today (torch fp32)",
        "cos vs torch fp32",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def ratio(sp):
        return f"{sp['median']:.2f}x ({sp['min']:.2f}-{sp['max']:.2f})" if sp else "-"

    for r in rows:
        cos = "-" if r["cosine_vs_fp32"] is None else f"{r['cosine_vs_fp32']:.4f}"
        params = "-" if r["params"] is None else f"{r['params'] / 1e6:.1f}"
        lines.append(
            f"| {r['model']} | {r['layers']} | {params} | {r['device']} | {r['backend']} | "
            f"{r['variant']} | {r['batch_size']} | {r['mode']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
            f"{r['queries_per_second']:.0f} | {ratio(r.get('speedup_same_backend'))} | "
            f"{ratio(r.get('speedup'))} | {cos} |"
        )
    return "\n".join(lines) + "\n" + "".join(f"\nnote: {n}" for n in notes) + "\n"


def model_facts(model) -> dict:
    if isinstance(model, lean.LeanEncoder):  # an exported folder given as a model: the graph's own facts
        return {"layers": model.meta.get("layers"), "params": model.meta.get("params"), "dim": model.meta["dim"]}
    return {
        "layers": students.depth(model),
        "params": int(sum(p.numel() for p in model.parameters())),
        "dim": model.get_embedding_dimension(),
    }


def device_rows(variants, facts, texts, device, batch_sizes, reference, repeats, warmup) -> list[dict]:
    """One row per (variant, batch size, mode) on one device. variants: (model, backend, variant) ->
    (object to time, the model's torch fp32 embeddings). Speedups: against the reference model's torch fp32
    (what users run today) and against its own row of the same backend and variant."""
    cosine = {
        k: None
        if isinstance(m, Floor) or ref is None
        else float(cosine_rows(m.encode_query(texts, batch_size=64), ref).mean())
        for k, (m, ref) in variants.items()
    }
    rows, today = [], (reference, "torch", "fp32")
    for bs in batch_sizes:
        for mode in ("end_to_end", "forward"):
            chosen = {k: v for k, v in variants.items() if mode == "end_to_end" or not isinstance(v[0], Floor)}
            times = measure(chosen, texts, bs, mode, device, repeats, warmup)
            for key, per_round in times.items():
                name, backend, variant = key
                same = (reference, backend, variant if backend != "numpy" else "fp32")
                same = same if same in times else (reference, "onnx", "fp32")
                refs = {"speedup": today, "speedup_same_backend": same}
                refs = {k: times[r] for k, r in refs.items() if r in times and r != key}
                rows.append(
                    {
                        "model": name,
                        **facts[name],
                        "device": device,
                        "backend": backend,
                        "variant": variant,
                        "batch_size": bs,
                        "mode": mode,
                        **summarize(per_round, refs, len(texts)),
                        "cosine_vs_fp32": cosine[key],
                    }
                )
                sp = rows[-1].get("speedup")
                logger.info(
                    "%s %s %s %s b=%d %s: p50 %.2f ms%s",
                    name,
                    device,
                    backend,
                    variant,
                    bs,
                    mode,
                    rows[-1]["p50_ms"],
                    f", speedup {sp['median']:.2f}x" if sp else "",
                )
    return rows


def given_teacher(rows: list[dict], ms: float) -> str:
    """Batch-1 end-to-end rows compared with a teacher latency the user gave (never measured here): the ratio is
    stored as speedup_vs_given_teacher, and the note says where the number came from."""
    said = []
    for r in rows:
        if r["batch_size"] == 1 and r["mode"] == "end_to_end" and r["backend"] != "tokenizer only":
            r["speedup_vs_given_teacher"] = {
                "teacher_ms": ms,
                "source": "given by the user",
                "ratio": ms / r["p50_ms"],
            }
            said.append(f"{r['model']} {r['backend']} {r['variant']} {ms / r['p50_ms']:.1f}x")
    return f"teacher latency {ms:g} ms at batch 1 given by the user (not measured here): " + "; ".join(said)


def add_export(variants: dict, name: str, enc, ref_emb) -> None:
    """An export's rows: its variant (onnx fp32/int8, or the static table in numpy) and the tokenizer-only floor."""
    variant = enc.meta["variant"]
    backend = "numpy" if variant == "static" else "onnx"
    variants[(name, backend, "fp32" if variant == "static" else variant)] = (enc, ref_emb)
    variants.setdefault((name, "tokenizer only", "-"), (Floor(enc), ref_emb))


def token_lengths(tokenizer, texts) -> dict:
    lengths = [len(x) for x in tokenizer(texts)["input_ids"]]
    return {
        "count": len(lengths),
        "min": min(lengths),
        "max": max(lengths),
        "mean": float(np.mean(lengths)),
        **{f"p{q}": float(np.percentile(lengths, q)) for q in (50, 90, 99)},
    }


def device_variants(args, device, plan, base, exports, paths, texts) -> dict:
    """(model, backend, variant) -> (object to time, the model's torch fp32 embeddings) on one device: torch
    variants of each loaded model, their cached exports with --backend onnx, and exported folders as given."""
    variants = {}
    for name, model in base.items():
        ref_emb = model.to(device).encode_query(texts, batch_size=64)
        for _, variant in [p for p in plan if p[0] == device]:
            variants[(name, "torch", variant)] = (make_variant(model, device, variant), ref_emb)
        if "onnx" in args.backend and device == "cpu":
            int8 = "int8" in args.quantize
            for enc in onnx_export.cached_export(
                name, paths[name], args.output_path, texts, int8, args.num_threads
            ).values():
                add_export(variants, name, enc, ref_emb)
    if device == "cpu":  # exported folders given as models: timed as they are (their source is not loaded)
        for name, enc in exports.items():
            add_export(variants, name, enc, None)
    return variants


def main(argv=None) -> dict:
    args = parse_args(argv)
    cli.start_run(args.log_level, args.seed, args.output_path)
    import torch

    torch.set_num_threads(args.num_threads)  # recorded; torch.utils.benchmark would silently use 1
    plan, notes = plan_variants(args.devices, args.precision, args.quantize, torch.cuda.is_available())
    if "onnx" in args.backend and "cpu" not in args.devices:
        notes.append("onnx: timed on cpu only (ONNX Runtime's CPU provider)")
    if not plan:
        raise UsageError(f"nothing to time on this machine ({'; '.join(notes)}); add --devices cpu --precision fp32")
    texts = data.query_texts(args.queries, args.data_dir)
    texts = [
        texts[i]
        for i in sorted(np.random.default_rng(args.seed).choice(len(texts), min(args.num_queries, len(texts)), False))
    ]
    paths = {name: encoders.resolve_model_path(name, args.data_dir) for name in args.models}  # all checked first
    exports = {
        name: lean.LeanEncoder(p, num_threads=args.num_threads)
        for name, p in paths.items()
        if onnx_export.is_export(p) and onnx_export.check_export(p)
    }
    if args.models[0] in exports and args.teacher_latency_ms is None:
        raise UsageError(f"the reference {args.models[0]} is an export; give the teacher's torch model first")
    base = {name: encoders.load_model(name, "cpu", path=paths[name])[0] for name in args.models if name not in exports}
    first = base.get(args.models[0])
    token_stats = token_lengths(first.tokenizer, texts) if first is not None else None
    reference = None if args.teacher_latency_ms else args.models[0]
    if any(v == "int8" for _, v in plan):
        notes.append(INT8_NOTE)
    rows = []
    for device in dict.fromkeys(d for d, _ in plan):
        variants = device_variants(args, device, plan, base, exports, paths, texts)
        facts = {name: model_facts(model) for name, model in {**base, **exports}.items()}
        rows += device_rows(
            variants, facts, texts, device, args.batch_sizes, reference, args.repeats, max(args.warmup, 1)
        )
    if args.teacher_latency_ms:
        notes.append(given_teacher(rows, args.teacher_latency_ms))
    result = {
        "config": run_files.run_info(vars(args), argv=argv, script=__file__),
        "num_threads": args.num_threads,
        "token_lengths": token_stats,
        "notes": notes,
        "results": rows,
    }
    out = Path(args.output_path) / "speed"
    run_files.write_json(out / f"{args.run_name}.json", result)
    table = markdown(rows, notes)
    run_files.write_text(out / f"{args.run_name}.md", table)
    print(table)
    return result


if __name__ == "__main__":
    cli.cli(main)
