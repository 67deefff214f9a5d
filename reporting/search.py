"""A search stage in the report (`search_section`, `search_findings`), read from its study.json record and its runs'
metrics.jsonl and FLOP records: the rung table (each configuration's validation loss at every rung it reached, what
became of it, and the seed noise measured at each rung), a summary table of the numbers the Findings cite, the FLOPs
it spent (the ledger's records of its runs) against the same configurations as a full grid, and search_<stage>.png:
validation loss against each configuration's cumulative training FLOPs, the cuts marked. A search that stopped
(every configuration of a rung diverged, or a killed run) says so, and names no winner; a damaged record is named.
"""
from __future__ import annotations

from pathlib import Path

from qwen_mini.flop_report import format_flops
from study.halving import record_fault

from . import figures as figs
from .format import loss, number
from .runs import Group, RunInfo

OUTCOME_ORDER = {"winner": 0, "reached the top": 1}


def _ladder(stage: dict) -> list[int]:
    """The rungs' steps (from the rungs themselves for a record that lacks the ladder)."""
    ladder = stage.get("ladder")
    if isinstance(ladder, list) and all(isinstance(s, int) for s in ladder):
        return ladder
    return [r["steps"] for r in stage.get("rungs", []) if isinstance(r, dict) and isinstance(r.get("steps"), int)]


def _members(group: Group) -> dict[str, RunInfo]:
    """The search's configurations and seed replicates by name."""
    return {r.run_dir.name: r for r in group.runs + group.replicates}


def _last_step(run: RunInfo | None) -> int:
    return run.steps if run is not None else 0


def outcomes(group: Group) -> dict[str, tuple[int, str]]:
    """Each configuration's (steps reached, what became of it), from the rung verdicts and its metrics."""
    stage, runs = group.record, _members(group)
    result = {Path(d).name: (0, "not trained yet") for d in stage.get("runs", [])}
    for rung in stage.get("rungs", []):
        for name in rung.get("runs", []):
            result[name] = (rung["steps"], "in this rung")
        for name in rung.get("cut", []):
            why = " (within the noise, cut for the budget)" if name in rung.get("ties_dropped", []) else ""
            result[name] = (rung["steps"], f"cut at {rung['steps']}{why}")
        for name in rung.get("ties", []):
            result[name] = (rung["steps"], f"kept within the noise at {rung['steps']}")
        if "winner" in rung:
            for name in rung["runs"]:
                result[name] = (rung["steps"], "winner" if name == rung["winner"] else "reached the top")
    reference = Path(str(stage.get("noise_reference") or "")).name
    if reference in result and result[reference][1].startswith("cut") and _last_step(runs.get(reference)) > \
            result[reference][0]:
        steps = _last_step(runs[reference])
        result[reference] = (steps, f"{result[reference][1]}; trained on to {steps} as the noise's reference")
    for name in stage.get("diverged", []):
        if name in result:  # (a seed replicate's divergence is the noise's: said there)
            at = _last_step(runs.get(name)) + 1  # the step that diverged is never logged
            result[name] = (at, f"diverged at step {at} (non-finite numbers): cut")
    if not stage.get("done"):
        for name, (steps, what) in result.items():
            if what == "in this rung":
                result[name] = (steps, "in progress")
    return result


def spent(group: Group) -> dict[str, int]:
    """What the search's runs (configurations and seed replicates) spent, by kind, from the ledger's records."""
    members = _members(group).values()
    return {kind: sum(r.flops(kind) for r in members) for kind in ("train", "eval")}


def summary(group: Group) -> dict[str, str]:
    """The numbers the Findings cite, printed as the summary table prints them."""
    stage = group.record
    flops = stage.get("flops") or {}
    top = stage["rungs"][-1] if stage.get("done") and stage.get("rungs") else None
    ranked = sorted((s, n) for n, s in zip(top["runs"], top["scores"]) if s is not None) if top else []
    noise = stage.get("noise")
    rows = {"configurations": str(len(stage.get("runs", []))),
            "rungs (steps)": ", ".join(str(s) for s in _ladder(stage)),
            "eta (1/eta of a rung goes on)": str(stage.get("eta")),
            "seed noise": f"{number(noise)} at step {noise_steps(stage)}" if noise is not None else "not measured"}
    if ranked:
        rows["winner"] = f"`{ranked[0][1]}`"
        rows["winner's loss at the top rung"] = loss(ranked[0][0])
        if len(ranked) > 1:
            rows["runner-up"] = f"`{ranked[1][1]}`"
            rows["runner-up's loss at the top rung"] = loss(ranked[1][0])
            rows["margin"] = loss(ranked[1][0] - ranked[0][0])
    used = spent(group)
    rows["search's training FLOPs (spent)"] = format_flops(used["train"])
    rows["search's FLOPs with validation (spent)"] = format_flops(used["train"] + used["eval"])
    if flops.get("grid_train"):
        rows["full grid's training FLOPs (counted)"] = format_flops(flops["grid_train"])
        rows["search / full grid, training FLOPs"] = f"{100 * used['train'] / flops['grid_train']:.0f} %"
        rows["full grid's FLOPs with validation (counted)"] = format_flops(flops.get("grid", 0))
    return rows


def noise_steps(stage: dict) -> int | None:
    """The step the record's noise was measured at: its top rung's (a record from before the noise went on with the
    rungs: its first rung's)."""
    steps = stage.get("noise_steps")
    return steps if isinstance(steps, int) else next(iter(_ladder(stage)), None)


def rung_table(group: Group) -> list[str]:
    stage = group.record
    ladder = _ladder(stage)
    scores = {(rung["steps"], name): score for rung in stage.get("rungs", [])
              for name, score in zip(rung.get("runs", []), rung.get("scores", []))}
    fates = outcomes(group)
    order = sorted(fates, key=lambda n: (OUTCOME_ORDER.get(fates[n][1], 2), -fates[n][0],
                                         scores.get((fates[n][0], n)) if scores.get((fates[n][0], n)) is not None
                                         else float("inf"), n))
    lines = ["| configuration | steps reached | " + " | ".join(f"loss @{s}" for s in ladder) + " | outcome |",
             "|---|---:|" + "---:|" * len(ladder) + "---|"]
    for name in order:
        steps, fate = fates[name]
        cells = [loss(scores[(s, name)]) if (s, name) in scores else "" for s in ladder]
        lines.append(f"| `{name}` | {steps} | " + " | ".join(cells) + f" | {fate} |")
    noises = {rung.get("steps"): rung.get("noise") for rung in stage.get("rungs", []) if "noise_scores" in rung}
    if any(v is not None for v in noises.values()):
        lines.append("| *seed noise at the rung* | | " + " | ".join(number(noises.get(s)) if noises.get(s) is not None
                                                                      else "" for s in ladder)
                     + " | the noise's reference over its seeds, at each rung's step |")
    return lines


def plot_search(path: Path, title: str, group: Group) -> Path:
    """Validation loss against each configuration's own cumulative training FLOPs (log axis): a line per
    configuration, its rung ends as dots, an x where it was cut; the winner thick."""
    plt = figs.plt
    fates, members = outcomes(group), _members(group)
    fig, ax = plt.subplots(figsize=(9, 5))
    drawn = 0
    for name in (Path(d).name for d in group.record.get("runs", [])):
        metrics = members[name].metrics if name in members else []
        points = [(m.get("flops"), m.get("val_loss")) for m in metrics
                  if m.get("step", 0) > 0 and isinstance(m.get("flops"), (int, float)) and m.get("flops") > 0
                  and figs.drawable(m.get("val_loss"))]
        if not points:
            continue
        x, y = zip(*points)
        fate = fates.get(name, (0, ""))[1]
        winner = fate == "winner"
        cut = fate.startswith("cut") or fate.startswith("diverged")
        style = dict(color="tab:red", linewidth=2.5, zorder=3) if winner else \
            dict(color="0.6", linewidth=1, zorder=1) if cut else dict(linewidth=1.5, zorder=2)
        ax.plot(x, y, label=f"{name} (winner)" if winner else (None if cut else name), **style)
        if cut:
            ax.plot(x[-1], y[-1], marker="x", color="black", markersize=7, zorder=4)
        drawn += 1
    starts = [m.get("val_loss") for r in members.values() for m in r.metrics[:1]
              if m.get("step") == 0 and figs.drawable(m.get("val_loss"))]
    if starts:  # (the same untrained model: one line, the lowest where context lengths differ)
        ax.axhline(min(starts), linestyle=":", color="0.3", label="step 0 (before training)")
    ax.plot([], [], linestyle="none", marker="x", color="black", label="cut here")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs of the configuration (cumulative)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{title}: successive halving, {drawn} configurations")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right", ncol=2)
    return figs.save(fig, path)


def search_section(group: Group, figures: Path, out: Path) -> list[str]:
    """The search's tables and figure, for its stage's section of the report."""
    stage = group.record
    fault = record_fault(stage)
    if fault is not None:
        return [f"The search record of this stage in study.json is damaged ({fault}): no rung or winner is read "
                "from it; its runs are above.", ""]
    runs, ladder = stage.get("runs") or [], _ladder(stage)
    if not ladder:
        return [f"Successive halving: no rung recorded yet ({len(runs)} configurations).", ""]
    lines = [f"Successive halving (eta {stage.get('eta')}): every configuration trained to {ladder[0]} "
             f"steps, the best 1/{stage.get('eta')} of each rung (and any within the seed noise of the last one "
             "kept) went on, each from its own checkpoint, up to "
             f"{ladder[-1]} steps. Seed noise: {stage.get('noise_how', 'not measured')}.", ""]
    state = progress(group)
    if state:
        lines += [state, ""]
    lines += ["| search | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in summary(group).items()] + [""]
    lines += rung_table(group) + [""]
    if group.replicates:
        lines += ["Seed replicates for the noise (not candidates): " + ", ".join(
            f"`{r.run_dir.name}` (trained to {r.steps} steps)" for r in group.replicates) + ".", ""]
    used, flops = spent(group), stage.get("flops") or {}
    if flops.get("grid_train"):
        lines += [f"FLOPs (the ledger's records of its runs): the search spent {format_flops(used['train'])} "
                  f"training FLOPs ({format_flops(used['train'] + used['eval'])} with validation); the same "
                  f"{len(runs)} configurations as a full grid to {ladder[-1]} steps would cost "
                  f"{format_flops(flops['grid_train'])} ({format_flops(flops.get('grid', 0))}).", ""]
    path = plot_search(figures / f"search_{figs.slug(group.name)}.png", group.name, group)
    lines += [f"![validation loss against each configuration's training FLOPs, cuts marked]"
              f"({path.relative_to(out).as_posix()})", ""]
    return lines


def progress(group: Group) -> str:
    """Where an unfinished search stopped, in words ("" once it is done)."""
    stage = group.record
    if stage.get("done"):
        return ""
    ladder, rungs = _ladder(stage), stage.get("rungs", [])
    at = len(rungs)  # the rung in progress
    if at >= len(ladder):
        return "The search is not finished: its top rung is not decided."
    names = [Path(d).name for d in stage.get("runs", [])]
    if rungs:
        names = [n for n in rungs[-1].get("kept", []) + rungs[-1].get("ties", [])]
    dead = [n for n in names if n in stage.get("diverged", [])]
    where = f"rung {at + 1} of {len(ladder)} ({ladder[at]} steps)"
    if names and len(dead) == len(names):
        return (f"The search stopped at {where}: every one of its {len(names)} configuration(s) diverged "
                "(non-finite numbers), so none can go on: no winner.")
    if stage.get("stopped"):
        return f"The search stopped at {where}: {stage['stopped']}; no winner."
    return (f"The search is not finished: {where} in progress, {len(names) - len(dead)} configuration(s) in it; no "
            "winner yet (the same train.py --plan command continues it).")


WINNER_LOSS = "winner's loss at the top rung"
SEARCH_TRAIN = "search's training FLOPs (spent)"
GRID_TRAIN = "full grid's training FLOPs (counted)"
SHARE = "search / full grid, training FLOPs"


def search_findings(group: Group) -> list[str]:
    """The Findings bullet of a search: what it found, for what share of the full grid's training FLOPs, its margin
    against the noise measured at the top rung; or where it stopped. Every number as the summary table prints it."""
    stage, label = group.record, group.name
    fault = record_fault(stage)
    if fault is not None:
        return [f"- **{label}**: its search record in study.json is damaged ({fault}); no winner is named."]
    rows = summary(group)
    if "winner" not in rows:
        return [f"- **{label}**: {progress(group) or 'the search named no winner.'}"]
    text = (f"- **{label}** (successive halving over {rows['configurations']} configurations, rungs at "
            f"{rows['rungs (steps)']} steps): {rows['winner']} won by the {stage.get('criterion')} "
            f"({rows[WINNER_LOSS]})")
    if "margin" in rows:
        top = stage["rungs"][-1]
        ranked = sorted(s for s in top["scores"] if s is not None)
        noise = stage.get("noise")
        verdict = ("the seed noise not measured" if noise is None else
                   "within the seed noise" if ranked[1] - ranked[0] <= noise else "beyond the seed noise")
        text += f", {rows['margin']} below the runner-up {rows['runner-up']} ({verdict}: {rows['seed noise']})"
    if SHARE in rows:
        text += (f"; it spent {rows[SEARCH_TRAIN]} training FLOPs, {rows[SHARE]} of the {rows[GRID_TRAIN]} the same "
                 "configurations would cost as a full grid")
    return [text + "."]
