"""Tables and the quality-vs-latency plot for `make example` and `make paper`, built from result files only.

    python3 report.py example --teacher_model sentence-transformers/all-MiniLM-L6-v2 \\
        --student output/example-minilm-L2/final --datasets scifact cranfield cacm --speed output/speed/example.json
    python3 report.py paper --teacher_model sentence-transformers/all-mpnet-base-v2 \\
        --students output/paper/L0-11/final output/paper/L0-1/final --datasets scifact --speed output/speed/paper.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from qdistill import cli, data, plots, results, run_files, stats
from qdistill.cli import UsageError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("kind", choices=["example", "paper", "agreement"])
    p.add_argument("--teacher_model", required=True)
    p.add_argument("--student", help="example: the student")
    p.add_argument("--students", nargs="+", default=[], help="paper: the students")
    p.add_argument("--datasets", nargs="+", required=True, help="names or folders, as given to evaluate_retrieval.py")
    p.add_argument("--speed", help="evaluate_speed.py JSON (example, paper)")
    p.add_argument(
        "--index",
        default="flat",
        type=index_kind,
        help="the results of this index kind: flat, hnsw, ivfpq, or given-<type> (a given approximate index)",
    )
    p.add_argument("--seed", type=cli.non_negative_int, default=0, help="bootstrap seed (as evaluate_retrieval.py)")
    p.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--output_path", default="output")
    return p.parse_args(argv)


def result_names(datasets: list[str]) -> dict[str, str]:
    """{dataset as given: the name of its result}, named as evaluate_retrieval.py names them (a collection file
    by its stem)."""
    stems = [Path(d).stem if Path(d).is_file() else Path(d).name for d in datasets]
    return dict(zip(datasets, data.display_names(stems)))


def index_kind(text: str) -> str:
    if text in ("flat", "hnsw", "ivfpq") or re.fullmatch(r"given-[a-z0-9_+-]+", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: flat, hnsw, ivfpq or given-<type> (e.g. given-hnswflat)")


def load_retrieval(output_path, teacher, model, dataset, name=None, index="flat") -> dict:
    """The labelled result of model on dataset (of that very folder when a folder is given)."""
    name = name or Path(dataset).name
    folder = Path(output_path) / "retrieval" / run_files.slug(teacher) / run_files.slug(model)
    path = folder / results.result_file(name, index)
    if not path.exists():
        if (folder / results.result_file(f"{name}-label-free", index)).exists():
            raise UsageError(
                f"{dataset} was evaluated label-free (no relevance labels): this report needs nDCG@10; "
                f"its agreement is in {folder / results.result_file(name + '-label-free', index)}"
            )
        raise UsageError(f"{path} missing; run evaluate_retrieval.py for {model} on {dataset} first")
    try:
        record = json.loads(path.read_text())
    except ValueError:
        raise UsageError(f"{path} is not JSON (damaged); rerun evaluate_retrieval.py with --overwrite") from None
    given, made = Path(dataset), Path(record.get("dataset_path", ""))
    if given.is_dir() and made.is_dir() and given.resolve() != made.resolve():
        raise UsageError(
            f"{path} holds results of {made}, not of {given}; "
            "run evaluate_retrieval.py with the datasets in this order"
        )
    return record


def speed_rows(speed_file, device="cpu", batch=1, mode="end_to_end", variant="fp32", backend="torch") -> dict:
    """{model: row} of one (device, batch, mode, variant, backend) cell: never another backend's numbers."""
    path = Path(speed_file)
    if not path.exists():
        raise UsageError(f"{path} missing; run evaluate_speed.py first")
    try:
        rows = json.loads(path.read_text())["results"]
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{path} is not an evaluate_speed.py result (JSON with 'results'); pass its output") from None
    want = {"device": device, "batch_size": batch, "mode": mode, "variant": variant, "backend": backend}
    return {r["model"]: r for r in rows if all(r.get(k) == v for k, v in want.items())}


def pair(args, model: str, dataset: str, name: str) -> tuple[dict, dict]:
    """(student's result, teacher's result) on one dataset, both holding per-query values (results.paired checks
    that they were made alike)."""
    teacher = load_retrieval(args.output_path, args.teacher_model, args.teacher_model, dataset, name, args.index)
    record = load_retrieval(args.output_path, args.teacher_model, model, dataset, name, args.index)
    for r, who in ((record, model), (teacher, "the teacher")):
        if "per_query" not in r or "metrics" not in r:
            raise UsageError(f"{who} on {name} has no per-query values (an older result); rerun evaluate_retrieval.py")
    return record, teacher


def example_table(args) -> str:
    speed = speed_rows(args.speed)
    lines = [
        "| dataset | training text | teacher nDCG@10 | student nDCG@10 | retention [95% CI] | p (paired t) |",
        "|---|---|---|---|---|---|",
    ]
    pairs = {"zero-shot": [], "in-domain": []}
    for d, name in result_names(args.datasets).items():
        record, teacher = pair(args, args.student, d, name)
        kind = results.kind(record)
        values = results.paired(record, teacher)
        pairs[kind].append(values)
        ci = stats.retention_ci(*values, seed=args.seed)
        t, s = teacher["metrics"]["NDCG@10"], record["metrics"]["NDCG@10"]
        p = "-" if ci["p_value"] is None else f"{ci['p_value']:.2g}"
        lines.append(f"| {name} | {kind} | {t:.4f} | {s:.4f} | {stats.fmt_ci(ci)} | {p} |")
    for kind, values in pairs.items():  # never one mean over both kinds
        if values:
            ci = stats.mean_retention_ci(values, seed=args.seed)
            lines.append(f"| **mean retention, {kind}** | | | | **{stats.fmt_ci(ci)}** | |")
    t_sp, s_sp = speed.get(args.teacher_model), speed.get(args.student)
    if t_sp and s_sp:
        sp = s_sp["speedup"]
        lines += [
            "",
            "| batch-1 CPU latency (encode_query, p50) | teacher | student | speedup |",
            "|---|---|---|---|",
            f"| {s_sp['device']}, {t_sp['calls'] // max(len(sp['per_round']), 1)} queries x {len(sp['per_round'])} "
            f"rounds | {t_sp['p50_ms']:.2f} ms | {s_sp['p50_ms']:.2f} ms | {sp['median']:.2f}x "
            f"({sp['min']:.2f}-{sp['max']:.2f}) |",
        ]
    return "\n".join(lines) + "\n"


def layers_label(path: str) -> str:
    m = re.search(r"L(\d+(?:-\d+)*)", Path(path).parent.name)
    return f"[{m.group(1).replace('-', ',')}]" if m else Path(path).parent.name


def paper_table(args) -> str:
    cpu = speed_rows(args.speed, "cpu")
    gpu = speed_rows(args.speed, "cuda")
    result = result_names(args.datasets)
    names = list(result.values())
    head = [
        "student",
        *[f"{d} nDCG@10" for d in names],
        "mean ret. nDCG@10",
        "mean ret. R@100",
        "CPU b1 ms",
        "CPU speedup",
    ]
    if gpu:
        head += ["GPU b1 ms", "GPU speedup"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    labels, points = [], []
    for model in [args.teacher_model, *args.students]:
        pairs = {d: pair(args, model, d, result[d]) for d in args.datasets}
        if any(r.get("in_domain_text") for r, _ in pairs.values()):
            raise UsageError(f"{model} trained on text of an evaluated collection; the paper table is zero-shot only")
        ms = {d: r["metrics"] for d, (r, _) in pairs.items()}
        # each dataset's ratio from the paired per-query values (made alike, same queries, leaked left out)
        ratios = {d: results.clean_ratio(*pairs[d]) for d in args.datasets}
        cis = [
            stats.mean_retention_ci([results.paired(*pairs[d], m) for d in args.datasets], seed=args.seed)
            for m in ("NDCG@10", "Recall@100")
        ]
        ret = cis[0]["value"]
        label = "teacher" if model == args.teacher_model else layers_label(model)
        # each dataset's nDCG@10 and, for students, its retention; the mean's interval beside the mean
        per_dataset = [
            f"{ms[d]['NDCG@10']:.4f}" + (f" ({ratios[d]:.2f})" if label != "teacher" and ratios[d] else "")
            for d in args.datasets
        ]
        cells = [label, *per_dataset, *map(stats.fmt_ci, cis)]
        for rows in (cpu, gpu) if gpu else (cpu,):
            r = rows.get(model)
            cells += [
                f"{r['p50_ms']:.2f}" if r else "-",
                f"{r['speedup']['median']:.2f}x" if r and "speedup" in r else "-",
            ]
        lines.append("| " + " | ".join(cells) + " |")
        if model in cpu:
            labels.append(label)
            points.append((cpu[model]["p50_ms"], float(ret)))
    plot = Path(args.output_path) / "paper_quality_latency.png"
    front = plots.plot_quality_latency(labels, points, plot, f"{args.teacher_model}: retention vs CPU batch-1 latency")
    lines += ["", f"Pareto front (CPU): {', '.join(labels[i] for i in front)}; plot: {plot}"]
    return "\n".join(lines) + "\n"


def agreement_table(args) -> str:
    """Label-free agreement beside nDCG@10 retention for every (student, dataset), and how well each agreement
    measure predicts retention: Spearman's rank correlation (scipy.stats.spearmanr) over all pairs, and a plot."""
    result = result_names(args.datasets)
    head = (
        "| student | dataset | training text | retention nDCG@10 [95% CI] | overlap@10 | top-1 in top-10 | query cos |"
    )
    lines = [head, "|---|---|---|---|---|---|---|"]
    points = []
    for model in args.students:
        for d, name in result.items():
            record, teacher = pair(args, model, d, name)
            if "agreement" not in record:
                raise UsageError(f"{model} on {name} has no agreement values; rerun evaluate_retrieval.py")
            ci = stats.retention_ci(*results.paired(record, teacher), seed=args.seed)
            agree = record["agreement"]
            kind = results.kind(record)
            lines.append(
                f"| {Path(model).parent.name or model} | {name} | {kind} | {stats.fmt_ci(ci)} | "
                + " | ".join(stats.fmt_ci(agree[m]) for m in ("overlap@10", "top1_in_top10", "query_cosine"))
                + " |"
            )
            points.append((ci["value"], *(agree[m]["value"] for m in ("overlap@10", "top1_in_top10", "query_cosine"))))
    if len(points) < 3:
        raise UsageError("the agreement report needs at least 3 (student, dataset) pairs; add students or datasets")
    ret = [p[0] for p in points]
    lines += ["", f"Spearman rank correlation with nDCG@10 retention over {len(points)} (student, dataset) pairs:"]
    for i, m in enumerate(("overlap@10", "top-1 in top-10", "query cosine"), 1):
        lines.append(f"- {m}: {spearman([q[i] for q in points], ret, args.seed)}")
    by_dataset = {}
    for name, point in zip([n for _ in args.students for n in result.values()], points):
        by_dataset.setdefault(name, []).append(point)
    lines.append("Within each dataset (ranking the students), overlap@10 vs retention:")
    for name, pts in by_dataset.items():
        if len(pts) >= 3:
            lines.append(
                f"- {name}: {spearman([q[1] for q in pts], [q[0] for q in pts], args.seed)}, {len(pts)} students"
            )
    plot = Path(args.output_path) / "agreement_vs_retention.png"
    plots.plot_agreement(points, plot, f"{args.teacher_model}: {len(args.students)} students x {len(result)} datasets")
    lines += ["", f"plot: {plot}"]
    return "\n".join(lines) + "\n"


def spearman(x, y, seed: int) -> str:
    """'rho = r (p = ...)': Spearman's rho with a permutation p-value, exact for up to 7 pairs (at n = 3 the
    smallest p is 1/3; scipy's t approximation printed 0 there)."""
    from scipy.stats import permutation_test, spearmanr

    rho = spearmanr(x, y).statistic
    if rho != rho:  # nan: a constant column
        return "rho undefined (a constant column)"
    test = permutation_test(
        (x,),
        lambda a: spearmanr(a, y).statistic,
        permutation_type="pairings",
        n_resamples=5039,  # 7! - 1: every pairing for n <= 7, a seeded sample above
        rng=np.random.default_rng(seed),
    )
    return f"rho = {rho:.3f} (p = {test.pvalue:.2g}, permutation)"


def main(argv=None) -> str:
    args = parse_args(argv)
    cli.setup_logging(args.log_level)
    if args.kind != "agreement" and not args.speed:
        raise UsageError(f"report.py {args.kind} needs --speed (an evaluate_speed.py JSON)")
    if args.kind == "example":
        if not args.student:
            raise UsageError("report.py example needs --student")
        table = example_table(args)
    elif args.kind == "agreement":
        if not args.students:
            raise UsageError("report.py agreement needs --students")
        table = agreement_table(args)
    else:
        table = paper_table(args)
    run_files.write_text(Path(args.output_path) / f"{args.kind}_results.md", table)
    print(table)
    return table


if __name__ == "__main__":
    cli.cli(main)
