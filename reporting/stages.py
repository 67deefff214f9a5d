"""The report's section of each training stage, in the study's order: the settings its runs share, one Runs table
(short names, the stage is the heading) with every run's validation loss on whole windows and on the same last-N
positions at step 0 and at its best, its winner and criterion, the split of a winner's margin into what step 0
already held and what training added (where the settings change the untouched model's loss, e.g. the context
length), the loss curves, the lr x rank heat map and the loss against context length; and the seed-replicates table
the noise is measured on."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qwen_mini.flop_report import format_flops
from training.config import TRAJECTORY_KEYS

from . import figures as figs
from . import format as fmt
from .figures import slug
from .runs import Group, Noise, RunInfo, improved, ranking
from .search import search_section

SHARED_SETTINGS = (("model", "model"), ("rank", "LoRA rank"), ("targets", "LoRA on"), ("lr", "lr"),
                   ("batch", "batch"), ("ctx", "ctx"), ("steps", "steps"), ("seed", "seed"), ("data", "data"))


def criterion_labels(group: Group) -> tuple[str, str]:
    """Column labels of the stage criterion's step-0 and best scores."""
    return (f"last {group.last_n} @0", f"best last {group.last_n}") if group.compares_last else ("val @0", "best val")


def verdict(run: RunInfo, noise: Noise) -> str:
    if run.change is None:
        return "-"
    judged = improved(run, noise)
    if judged is None:  # the noise is unmeasured: say only which way it went
        return "lower" if run.change < 0 else "not lower"
    return "improved" if judged else "**not improved**"


def runs_table(group: Group, noise: Noise) -> list[str]:
    """One row per run of the stage (and its seed replicates): steps, whole-window and last-N validation loss at
    step 0 and at their best, the change, the verdict against the noise, the score's distance to the winner, FLOPs."""
    n = group.last_n
    ranked = dict((id(r), s) for r, s in ranking(group))
    winner = ranking(group)[0] if ranked else None
    header = ["run", "steps", "val @0", "best val"] + ([f"last {n} @0", f"best last {n}"] if n else []) + \
        ["change", "verdict"] + (["vs winner"] if winner and len(group.runs) > 1 else []) + ["FLOPs"]
    rows = []
    for run in group.runs + group.replicates:
        name = f"`{run.short_name(group.home)}`" + (" (seed replicate)" if run in group.replicates else "")
        row = [name, f"{run.steps}/{run.config.get('steps')}", fmt.loss(run.val0), fmt.loss(run.best_val)]
        if n:
            row += [fmt.loss(run.last0(n)), fmt.loss(run.best_last(n))]
        row += [fmt.delta(run.change), verdict(run, noise)]
        if "vs winner" in header:
            score = ranked.get(id(run))
            row.append("winner" if run is winner[0] else "-" if score is None else fmt.delta(score - winner[1]))
        rows.append(row + [format_flops(run.total_flops)])
    return fmt.table(header, rows)


def continued_lines(group: Group) -> list[str]:
    """What each run that continued another run's checkpoint did not train again: the steps up to it, and their
    training FLOPs (booked by the run it continued; the table's FLOPs are the run's own steps)."""
    lines = []
    for run in group.runs:
        step, origin = run.config.get("continued_from_step"), run.config.get("continue_from")
        if isinstance(step, int) and step > 0 and isinstance(origin, str):
            saved = step * (run.config.get("per_step_flops") or 0)
            lines += [f"`{run.short_name(group.home)}` continued `{Path(origin).parent.name}/{Path(origin).name}` "
                      f"from its step {step}: continuing saved {step} steps and {format_flops(saved)} training FLOPs "
                      f"(booked by that run); its FLOPs above are its own {run.steps - step} steps.", ""]
    return lines


@dataclass(frozen=True)
class Gap:
    """A run against the stage's winner under the stage's criterion: what step 0 held, what training added."""
    run: RunInfo
    at0: float
    best: float

    @property
    def trained(self) -> float:
        return self.best - self.at0


def decomposition(group: Group) -> list[Gap]:
    """Every scored run against the winner (the winner first), when the untouched model's step-0 scores differ
    between the runs as printed (the stage varies what the model sees, not only how it trains); else []."""
    gaps = [Gap(r, group.score0(r), s) for r, s in ranking(group) if group.score0(r) is not None]
    if len(gaps) < 2 or gaps[0].run is not ranking(group)[0][0]:
        return []
    return gaps if len({fmt.loss(g.at0) for g in gaps}) > 1 else []


def decomposition_table(group: Group, gaps: list[Gap]) -> list[str]:
    at0, best = criterion_labels(group)
    winner = gaps[0]
    rows = [[f"`{g.run.short_name(group.home)}`", fmt.loss(g.at0), fmt.loss(g.best), fmt.delta(g.trained),
             fmt.delta(g.at0 - winner.at0), fmt.delta(g.trained - winner.trained), fmt.delta(g.best - winner.best)]
            for g in gaps]
    return fmt.table(["run", at0, best, "training's change", "vs winner at step 0", "vs winner from training",
                      "vs winner at best"], rows)


def shared_settings(group: Group) -> str:
    """The settings every run of the stage has, in words."""
    first = group.runs[0].config
    parts = []
    for key, label in SHARED_SETTINGS:
        values = {json.dumps(r.config.get(key), sort_keys=True) for r in group.runs}
        if key in group.varied or len(values) > 1 or first.get(key) is None:
            continue
        value = first[key]
        if key == "model" or key == "data":
            value = Path(str(value)).name
        elif key == "rank" and first.get("full"):
            label, value = "full fine-tuning", ""
        elif key == "targets":
            value = ",".join(value) if isinstance(value, list) else value
        parts.append(f"{label} {fmt.setting(value)}".strip())
    return ", ".join(parts)


def group_section(group: Group, figures: Path, out: Path, noise: Noise, budget: int) -> list[str]:
    lines = [f"### {group.name}", ""]
    what = f"Varied: {', '.join(group.varied)}. " if group.varied else ""
    lines += [f"{what}Every run: {shared_settings(group)}.", ""]
    at0, best = criterion_labels(group)
    lines += ["`change`: best val minus val @0 (whole windows); `verdict`: " +
              (f"improved when the change is below -{fmt.number(noise.value)}, the noise of the {noise.criterion}"
               + (f" (a search's, at step {noise.steps})" if noise.steps is not None else "") if noise.measured
               else "which way it went (the noise is unmeasured: no seed replicates)") +
              (f"; `vs winner`: the run's {best} minus the winner's" if len(group.runs) > 1 and ranking(group)
               else "") + ".", ""]
    lines += runs_table(group, noise) + [""] + continued_lines(group)
    ranked = ranking(group)
    if len(group.runs) > 1 and ranked:
        lines += [f"Winner: `{ranked[0][0].short_name(group.home)}`, chosen by the {group.criterion} "
                  f"({fmt.loss(ranked[0][1])}).", ""]
    gaps = decomposition(group)
    if gaps:
        lines += [f"What the winner's margin is made of: the {at0[:-3]} loss of the untouched model (step 0), and "
                  "the change training made to it:", ""] + decomposition_table(group, gaps) + [""]
    lines += search_lines(group, figures, out)
    lines += figure_lines(group, figures, out, noise, budget)
    return lines


def search_lines(group: Group, figures: Path, out: Path) -> list[str]:
    """A successive-halving stage's rungs (reporting.search)."""
    if not group.record.get("search"):
        return []
    try:
        return search_section(group, figures, out) + [""]
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:  # a hand-edited study.json
        return [f"The search record of this stage cannot be read ({type(e).__name__}: {e}); its runs are above.", ""]


def figure_lines(group: Group, figures: Path, out: Path, noise: Noise, budget: int) -> list[str]:
    lines, name = [], slug(group.name)
    if len(group.runs) >= 2:
        keys = group.varied or ["lr", "rank", "ctx"]
        curves = [(", ".join(f"{k}={fmt.setting(r.config.get(k))}" for k in keys),
                   [(m["step"], m["train_loss"]) for m in r.metrics if fmt.finite(m.get("train_loss"))], r.val)
                  for r in group.runs]
        lines += [fmt.image(figs.plot_group_losses(figures / f"loss_{name}.png", group.name, curves), out,
                            "loss curves"), ""]
    cells = {(r.config.get("lr"), r.config.get("rank")): (r.change, r.steps, 100 * r.total_flops / budget,
                                                          bool(improved(r, noise)) if noise.measured else
                                                          (r.change or 0) < 0)
             for r in group.runs if not r.config.get("full")}
    lrs, ranks = sorted({k[0] for k in cells}, key=str), sorted({k[1] for k in cells}, key=str)
    if len(lrs) >= 2 or len(ranks) >= 2:
        lrs, ranks = sorted(lrs), sorted(ranks)
        lines += [fmt.image(figs.plot_heatmap(figures / f"heatmap_{name}.png", group.name, lrs, ranks, cells,
                                              noise.value or 0.0), out,
                            "change of the best validation loss from step 0 over lr x rank"), ""]
    sweeps, n = context_points(group)
    if sweeps:
        lines += [fmt.image(figs.plot_context(figures / f"context_{name}.png", group.name, sweeps, n), out,
                            "validation loss against context length"), ""]
        if n is None:
            lines += ["The runs recorded no last-N validation losses: their whole-window losses are not "
                      "comparable across context lengths.", ""]
    return lines


def context_points(group: Group) -> tuple[dict, int | None]:
    """{label: [(ctx, best whole-window loss, best last-N loss, last-N loss at step 0)]} of runs that differ only in
    context length, and the N all of them recorded."""
    sets: dict[str, list[RunInfo]] = {}
    for run in group.runs:
        key = json.dumps({k: run.config.get(k) for k in (*TRAJECTORY_KEYS, "steps") if k not in ("ctx", "stride")},
                         sort_keys=True, default=str)
        sets.setdefault(key, []).append(run)
    sweeps = {}
    for members in sets.values():
        by_ctx = {}
        for run in members:
            by_ctx.setdefault(run.config.get("ctx"), run)
        if len(by_ctx) >= 2 and all(isinstance(c, int) for c in by_ctx):
            first = members[0].config
            label = f"lr {fmt.setting(first.get('lr'))}, " + ("full" if first.get("full") else
                                                             f"rank {first.get('rank')}")
            sweeps[label] = sorted(by_ctx.values(), key=lambda r: r.config.get("ctx"))
    members_all = [r for runs in sweeps.values() for r in runs]
    n = Group("", members_all, Path(".")).last_n if members_all else None
    return {label: [(r.config["ctx"], r.best_val, r.best_last(n) if n else None, r.last0(n) if n else None)
                    for r in runs] for label, runs in sweeps.items()}, n


def noise_section(replicate_sets: list[list[RunInfo]], noises: list[Noise]) -> list[str]:
    """The seed replicates and the spread of each criterion's score between them: every set of runs that differ in
    the seed alone (their best scores), and each search's noise (its reference's loss at the step it was measured)."""
    lines = ["### Seed replicates and the noise", ""]
    searched = [n for n in noises if n.steps is not None and n.measured]
    if not replicate_sets and not searched:
        return lines + ["No seed replicates (runs that differ in the seed alone): the noise is unmeasured, and no "
                        "difference in this report is held against it.", ""]
    rows = []

    def row(members, noise: Noise, what: str) -> list[str]:
        scores = [noise.score(r) for r in members]
        return [", ".join(f"`{r.stage_name}`" for r in members), ", ".join(str(r.config.get("seed")) for r in members),
                noise.criterion + what, ", ".join(fmt.loss(v) for v in scores),
                fmt.number(max(scores) - min(scores)) if all(v is not None for v in scores) else "-"]

    generic = list(dict.fromkeys(n.last_n for n in noises if n.steps is None))
    for members in replicate_sets:
        rows += [row(members, Noise("whole-window validation loss" if n is None else
                                    f"validation loss over the last {n} targets", n, None), "")
                 for n in generic or [None]]
    rows += [row(n.replicates, n, f", at step {n.steps} (a search's)") for n in searched]
    return lines + ["Runs that differ in the seed alone; the noise of a criterion is the largest spread of its score "
                    "between the seeds of one setting (each run's best score; a search's: at the step it measured "
                    "it, its top rung's):", ""] + \
        fmt.table(["runs", "seeds", "criterion", "best, per seed", "spread"], rows) + [""]
