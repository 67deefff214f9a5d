"""A search stage in the report (`search_section`, `search_findings`), read from its study.json record and its runs'
metrics.jsonl: the rung table (each configuration's validation loss at every rung it reached, and what became of
it), a summary table of the numbers the Findings cite, the FLOPs it spent against the same configurations as a full
grid, and search_<stage>.png: validation loss against each configuration's cumulative training FLOPs, the cuts
marked.
"""
from __future__ import annotations

from pathlib import Path

from qwen_mini.flop_report import format_flops
from study.selection import run_metrics

from . import figures as figs
from .format import loss

OUTCOME_ORDER = {"winner": 0, "reached the top": 1}


def _ladder(stage: dict) -> list[int]:
    """The rungs' steps (from the rungs themselves for a record that lacks the ladder)."""
    ladder = stage.get("ladder")
    if isinstance(ladder, list) and all(isinstance(s, int) for s in ladder):
        return ladder
    return [r["steps"] for r in stage.get("rungs", []) if isinstance(r, dict) and isinstance(r.get("steps"), int)]


def _names(stage: dict) -> dict[str, Path]:
    return {Path(d).name: Path(d) for d in stage.get("runs", [])}


def outcomes(stage: dict) -> dict[str, tuple[int, str]]:
    """Each configuration's (steps reached, what became of it), from the rung verdicts."""
    ladder = _ladder(stage)
    result = {name: (0, "not trained yet") for name in _names(stage)}
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
    for name in stage.get("diverged", []):
        result[name] = (result.get(name, (0, ""))[0], "diverged (non-finite numbers): cut")
    if ladder and not stage.get("done"):
        for name, (steps, what) in result.items():
            if what == "in this rung":
                result[name] = (steps, "in progress")
    return result


def summary(stage: dict) -> dict[str, str]:
    """The numbers the Findings cite, printed as the summary table prints them."""
    flops = stage.get("flops") or {}
    top = stage["rungs"][-1] if stage.get("done") and stage.get("rungs") else None
    ranked = sorted((s, n) for n, s in zip(top["runs"], top["scores"]) if s is not None) if top else []
    rows = {"configurations": str(len(stage.get("runs", []))),
            "rungs (steps)": ", ".join(str(s) for s in _ladder(stage)),
            "eta (1/eta of a rung goes on)": str(stage.get("eta")),
            "seed noise": loss(stage.get("noise")) if stage.get("noise") is not None else "not measured"}
    if ranked:
        rows["winner"] = f"`{ranked[0][1]}`"
        rows["winner's loss at the top rung"] = loss(ranked[0][0])
        if len(ranked) > 1:
            rows["runner-up"] = f"`{ranked[1][1]}`"
            rows["runner-up's loss at the top rung"] = loss(ranked[1][0])
            rows["margin"] = loss(ranked[1][0] - ranked[0][0])
    if flops.get("grid_train"):
        rows["search's training FLOPs (spent)"] = format_flops(flops.get("search_train", 0))
        rows["full grid's training FLOPs (counted)"] = format_flops(flops["grid_train"])
        rows["search / full grid, training FLOPs"] = f"{100 * flops.get('search_train', 0) / flops['grid_train']:.0f} %"
        rows["search's FLOPs with validation (spent)"] = format_flops(flops.get("search", 0))
        rows["full grid's FLOPs with validation (counted)"] = format_flops(flops.get("grid", 0))
    return rows


def rung_table(stage: dict) -> list[str]:
    ladder = _ladder(stage)
    scores = {(rung["steps"], name): score for rung in stage.get("rungs", [])
              for name, score in zip(rung.get("runs", []), rung.get("scores", []))}
    fates = outcomes(stage)
    order = sorted(fates, key=lambda n: (OUTCOME_ORDER.get(fates[n][1], 2), -fates[n][0],
                                         scores.get((fates[n][0], n)) if scores.get((fates[n][0], n)) is not None
                                         else float("inf"), n))
    lines = ["| configuration | steps reached | " + " | ".join(f"loss @{s}" for s in ladder) + " | outcome |",
             "|---|---:|" + "---:|" * len(ladder) + "---|"]
    for name in order:
        steps, fate = fates[name]
        cells = [loss(scores[(s, name)]) if (s, name) in scores else "" for s in ladder]
        lines.append(f"| `{name}` | {steps} | " + " | ".join(cells) + f" | {fate} |")
    return lines


def plot_search(path: Path, title: str, stage: dict) -> Path:
    """Validation loss against each configuration's own cumulative training FLOPs (log axis): a line per
    configuration, its rung ends as dots, an x where it was cut; the winner thick."""
    plt = figs.plt
    fates = outcomes(stage)
    fig, ax = plt.subplots(figsize=(9, 5))
    drawn = 0
    for name, run_dir in _names(stage).items():
        points = [(m.get("flops"), m.get("val_loss")) for m in run_metrics(run_dir)
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
    starts = [m.get("val_loss") for d in _names(stage).values() for m in run_metrics(d)[:1]
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


def search_section(stage: dict, figures: Path, out: Path, title: str | None = None) -> list[str]:
    """The search's tables and figure, for its stage's section of the report."""
    runs, ladder = stage.get("runs") or [], _ladder(stage)
    if not ladder:
        return [f"Successive halving: no rung recorded yet ({len(runs)} configurations).", ""]
    title = title or (f"{Path(runs[0]).parents[1].name}/{stage.get('name')}" if runs else stage.get("name", "search"))
    flops = stage.get("flops") or {}
    lines = [f"Successive halving (eta {stage.get('eta')}): every configuration trained to {ladder[0]} "
             f"steps, the best 1/{stage.get('eta')} of each rung (and any within the seed noise of the last one "
             "kept) went on, each from its own checkpoint, up to "
             f"{ladder[-1]} steps. Seed noise: {stage.get('noise_how', 'not measured')}.", "",
             "| search | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in summary(stage).items()] + [""]
    lines += rung_table(stage) + [""]
    if stage.get("noise_runs"):
        lines += [f"Seed replicates for the noise (trained to {ladder[0]} steps, not candidates): "
                  + ", ".join(f"`{Path(d).name}`" for d in stage["noise_runs"]) + ".", ""]
    if flops.get("grid_train"):
        lines += [f"FLOPs: the search spent {format_flops(flops.get('search_train', 0))} training FLOPs "
                  f"({format_flops(flops.get('search', 0))} with validation); the same "
                  f"{len(stage.get('runs', []))} configurations as a full grid to {ladder[-1]} steps would "
                  f"cost {format_flops(flops['grid_train'])} ({format_flops(flops.get('grid', 0))}).", ""]
    path = plot_search(figures / f"search_{figs.slug(title)}.png", title, stage)
    lines += [f"![validation loss against each configuration's training FLOPs, cuts marked]"
              f"({path.relative_to(out).as_posix()})", ""]
    return lines


WINNER_LOSS = "winner's loss at the top rung"
SEARCH_TRAIN = "search's training FLOPs (spent)"
GRID_TRAIN = "full grid's training FLOPs (counted)"
SHARE = "search / full grid, training FLOPs"


def search_findings(stage: dict, label: str) -> list[str]:
    """The Findings bullet of a search: what it found, for what share of the full grid's training FLOPs; every number
    as the summary table prints it."""
    rows = summary(stage)
    if "winner" not in rows:
        return [f"- **{label}**: the search is not finished ({len(stage.get('rungs', []))} of "
                f"{len(_ladder(stage))} rungs decided)."]
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
