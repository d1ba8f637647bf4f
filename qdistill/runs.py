"""Run folders of distillation.py: their names, refusing to overwrite another run, and resume points."""

from __future__ import annotations

from pathlib import Path

from qdistill import recipes, run_files
from qdistill.cli import UsageError


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint: trainer_state.json is written last, so a killed save has none."""
    done = [c for c in folder.glob("checkpoint-*") if (c / "trainer_state.json").is_file() and c.name[11:].isdigit()]
    return max(done, key=lambda c: int(c.name[11:]), default=None)


def resume_point(run_dir: Path, resume: str | None) -> str | None:
    if resume is None:
        return None
    path = latest_checkpoint(run_dir / "checkpoints") if resume == "latest" else Path(resume)
    if path is None:
        raise UsageError(f"no complete checkpoint under {run_dir / 'checkpoints'}; drop --resume_from_checkpoint")
    if not (path / "trainer_state.json").is_file():
        raise UsageError(f"--resume_from_checkpoint {path} is not a complete checkpoint (no trainer_state.json)")
    return str(path)


def run_names(init: str, inits: list[str], run_name: str | None, teacher: str, layers: list[int] | None) -> list:
    """(student init, run folder name) per student: <run_name>/<student> for pretrained ones, unique names."""
    teacher = run_files.slug(Path(teacher).name)
    if init != "pretrained":
        default = f"{teacher}-static" if init == "static" else f"{teacher}-L{'-'.join(map(str, layers or []))}"
        return [(init, run_name or default)]
    names = [run_files.slug(Path(m).name) for m in inits]
    names = [n if names[:i].count(n) == 0 else f"{n}~{names[:i].count(n) + 1}" for i, n in enumerate(names)]
    return [(m, f"{run_name or teacher + '-pretrained'}/{n}") for m, n in zip(inits, names)]


def plan_runs(names, output_path, overwrite: bool, resume: str | None, recipe_of, skip: bool = False) -> list[dict]:
    """One entry per student: its run folder, resume point, recipe (recipe_of(init)) and whether it is done.

    done: with skip (--skip_finished), the folder holds a run finished by the same recipe, kept as it is. A
    non-empty folder that is not done is refused unless it is overwritten or resumed.
    """
    plans = []
    for init, name in names:
        run_dir = Path(output_path) / name
        recipe = recipe_of(init)
        done = skip and recipes.finished_with(run_dir, recipe)
        if not done and run_dir.is_dir() and any(run_dir.iterdir()) and not (overwrite or resume):
            why = "holds no finished run of this recipe (the line above says why)" if skip else "is not empty"
            raise UsageError(f"{run_dir} {why}; pass --overwrite_output_dir or another --run_name")
        plans.append(
            {"init": init, "run_dir": run_dir, "resume": resume_point(run_dir, resume), "recipe": recipe, "done": done}
        )
    return plans
