"""The report's Findings and Conclusions, stated from the numbers only: every number in them is printed by the same
function, from the same value, as in a table of the report (the stage's Runs table, its margin table, the seed
replicates, a forecast's score and difference tables, the per-stage FLOP table), with the criterion named beside
it; no sentence is written unless the numbers it states are there.
"""
from __future__ import annotations

from dataclasses import dataclass

from qwen_mini.flop_report import format_flops

from . import format as fmt
from .calibration import calibration_findings, read_band_check
from .forecasts import HIGHER_IS_BETTER, NOT_RANKED, result_differences, shown_columns, validation_choice
from .results import FINE_TUNED, ZERO_SHOT, StageResult
from .runs import Group, Noise, improved, ranking
from .search import search_findings
from .stages import decomposition
from .uncertainty import LEVEL

ORDERED = ("lr", "rank", "ctx", "steps", "batch")  # settings with a highest and a lowest value


@dataclass(frozen=True)
class StageGain:
    """What a stage's FLOPs bought: its winner's score under its criterion against where the stage started."""
    name: str
    flops: int
    start_label: str | None = None  # "step 0", or the source stage's winner
    start: float | None = None
    best: float | None = None

    @property
    def change(self) -> float | None:
        return None if self.start is None or self.best is None else self.best - self.start

    @property
    def per_nat(self) -> str:
        return f"{self.flops / -self.change:.3g}" if self.change is not None and self.change < 0 else "-"


def stage_gain(group: Group, groups: list[Group], flops: int) -> StageGain:
    ranked = ranking(group)
    if not ranked:
        return StageGain(group.name, flops)
    winner, best = ranked[0]
    source = group.record.get("from")
    origin = next((g for g in groups if source and g.record.get("name") == source and g.home.parent ==
                   group.home.parent), None)
    start_run = None
    if origin is not None:
        start_run = origin.best or next((r for r, _ in ranking(origin)), None) or origin.runs[0]
    if start_run is None:
        return StageGain(group.name, flops, "step 0", group.score0(winner), best)
    return StageGain(group.name, flops, f"{source}'s winner", group.score(start_run), best)


def _winner_line(group: Group, noise: Noise) -> list[str]:
    ranked = ranking(group)
    if len(ranked) < 2:
        return []
    (winner, best), (second, score) = ranked[0], ranked[1]
    margin = score - best
    verdict = ("noise unmeasured" if not noise.measured else
               f"beyond the noise ({noise_value(noise)})" if margin > noise.value else
               f"**within the noise** ({noise_value(noise)}): this stage did not tell its settings apart")
    text = (f"- **{group.name}** ({', '.join(group.varied) or 'runs'}): `{winner.short_name(group.home)}` won by the "
            f"{group.criterion} ({fmt.loss(best)}); the runner-up `{second.short_name(group.home)}` scored "
            f"{fmt.delta(margin)} above it: {verdict}.")
    gaps = decomposition(group)
    runner = next((g for g in gaps if g.run is second), None)
    if runner is not None:
        text += (f" Of that {fmt.delta(margin)}, {fmt.delta(runner.at0 - gaps[0].at0)} was there at step 0, before "
                 f"any training (the {', '.join(group.varied)} changed what the untouched model sees), and "
                 f"{fmt.delta(runner.trained - gaps[0].trained)} came from training (training's change "
                 f"{fmt.delta(gaps[0].trained)} for the winner, {fmt.delta(runner.trained)} for the runner-up).")
    return [text]


def noise_value(noise: Noise) -> str:
    """The noise's value, and where a search measured it."""
    return fmt.number(noise.value) + (f" at step {noise.steps}" if noise.steps is not None else "")


def stage_findings(group: Group, noise: Noise, whole: Noise) -> list[str]:
    """The stage's winner and margin against the noise of its criterion (`noise`); a one-run stage's change from
    step 0 against the noise of the whole-window loss (`whole`)."""
    if group.record.get("search"):
        try:
            return search_findings(group)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):  # named in the stage's section
            return [f"- **{group.name}**: its search record cannot be read (see its section)."]
    if group.no_winner:
        return [f"- **{group.name}**: {group.no_winner}: no run is named its winner."]
    if len(group.runs) > 1:
        return _winner_line(group, noise)
    run = group.runs[0]
    if run.change is None:
        return []
    judged = improved(run, whole)
    verdict = ("noise unmeasured" if judged is None else
               f"improved beyond the noise ({noise_value(whole)})" if judged else
               f"**not improved** beyond the noise ({noise_value(whole)})")
    return [f"- **{group.name}**: one run, `{run.short_name(group.home)}`: best validation loss "
            f"{fmt.loss(run.best_val)}, {fmt.delta(run.change)} from step 0: {verdict}."]


def result_findings(result: StageResult) -> list[str]:
    """Per species: the subject against zero-shot (MSE, with its interval), every baseline it loses to and on
    which scores, the baselines it beats on every score; a validation forecast's choice."""
    lines, subject = [], result.subject
    diffs = result_differences(result)
    head = f"- **{result.name}**{result.where}"
    for species, rows in diffs.items():
        mse = ((result.methods.get(subject) or {}).get(species) or {}).get("mse")
        if not fmt.finite(mse):
            continue
        parts = [f"{subject} MSE {fmt.number(mse)}"]
        zero = next((d for d in rows if d.reference == ZERO_SHOT and d.label == "MSE"), None)
        if zero is not None:
            parts[0] += f" against zero-shot {fmt.number(zero.old)}: {_difference_text(zero)}"
        losses, wins = baseline_comparison(result, species, rows)
        parts += [f"worse than {name} on " + ", ".join(items) for name, items in losses.items()]
        if wins:
            parts.append(f"better than {', '.join(wins)} on every score shown")
        paired = next((d.trajectories for d in rows if d.interval is not None), None)
        over = f" ({LEVEL} % intervals over {paired} trajectories)" if paired else ""
        lines.append(f"{head}, {species}: " + "; ".join(parts) + f"{over}.")
    choice = validation_choice(result)
    if choice is not None:
        winner, fine, zero = choice
        lines.append(f"{head}: this validation forecast chooses the {winner} model by the geometric mean over the "
                     f"species of the MSE ({fmt.number(fine)} fine-tuned, {fmt.number(zero)} zero-shot).")
    return lines + calibration_findings(result, read_band_check(result, []))  # its faults: named in Results


def _difference_text(d) -> str:
    """"+21.1 % [+3.0 %, +51.9 %]", with "not distinguishable" when the interval holds 0 %."""
    interval = f" {d.interval_text}" if d.interval is not None else ""
    return f"{d.change}{interval}" + (" (not distinguishable)" if d.distinguishable is False else "")


def baseline_comparison(result: StageResult, species: str, rows) -> tuple[dict[str, list[str]], list[str]]:
    """({baseline: ["medMSE 0.1059 vs 0.02931 (x3.61 [...], higher)", ...]} where the subject is worse, [baselines
    it is no worse than on any score])."""
    keys, _ = shown_columns(result, species)
    mine = (result.methods.get(result.subject) or {}).get(species) or {}
    losses, wins = {}, []
    for name in result.baselines:
        theirs = (result.methods.get(name) or {}).get(species) or {}
        items = []
        for key, label in keys:
            new, old = mine.get(key), theirs.get(key)
            if key in NOT_RANKED or not (fmt.finite(new) and fmt.finite(old)) or new == old:
                continue
            if (new < old) if key in HIGHER_IS_BETTER else (new > old):
                d = next((d for d in rows if d.reference == name and d.label == label), None)
                items.append(f"{label} {_difference_text(d)}" if d is not None else label)
        if items:
            losses[name] = items
        elif theirs:
            wins.append(name)
    return losses, wins


def findings(groups: list[Group], noises: dict[str, Noise], wholes: dict[str, Noise], results: list[StageResult]
             ) -> list[str]:
    """Per stage, from its own study (reporting.runs.stage_noises): `noises`, the noise of its criterion; `wholes`, of
    the whole-window loss (each run's change)."""
    lines = ["## Findings", ""]
    used = list(dict.fromkeys([*wholes.values(), *noises.values()]))
    unmeasured = list(dict.fromkeys(n.criterion for n in used if not n.measured))
    lines += list(dict.fromkeys(noise_line(n) for n in used if n.measured))
    if unmeasured:
        stages = [g.name for g in groups if not noises[g.name].measured or not wholes[g.name].measured]
        lines.append(f"Noise of the {' and of the '.join(unmeasured)} of {', '.join(stages)}: unmeasured (no seed "
                     "replicates of its study measure it); no margin there is held against it.")
    lines.append("")
    for group in groups:
        lines += stage_findings(group, noises[group.name], wholes[group.name])
    flat = [(g, r) for g in groups for r in g.runs if improved(r, wholes[g.name]) is False and len(g.runs) > 1]
    if flat:
        lines.append("- Not improved on step 0 beyond the noise: " + ", ".join(
            f"{g.name} `{r.short_name(g.home)}` ({fmt.delta(r.change)})" for g, r in flat) + ".")
    for result in results:
        lines += result_findings(result)
    return lines + [""]


def noise_line(noise: Noise) -> str:
    members = ", ".join(f"`{r.stage_name}`" for r in noise.replicates)
    seeds = ", ".join(str(r.config.get("seed")) for r in noise.replicates)
    if noise.steps is not None:
        return (f"Noise of the {noise.criterion}: {fmt.number(noise.value)}, measured by the search at step "
                f"{noise.steps}: the spread of one configuration's loss there between seeds {seeds} ({members}; table "
                "\"Seed replicates and the noise\").")
    return (f"Noise of the {noise.criterion}: {fmt.number(noise.value)}, the spread of the best score between seeds "
            f"{seeds} of one setting ({members}; table \"Seed replicates and the noise\").")


# ---- conclusions ---------------------------------------------------------------------------------------------------

def conclusions(groups: list[Group], noises: dict[str, Noise], results: list[StageResult],
                gains: list[StageGain], left_share: str) -> list[str]:
    lines = ["## Conclusions", ""]
    seeds = {g.name for g in groups if g.varied == ["seed"]}
    lines += fine_tuning_bought(results)
    for group in groups:
        lines += settings_mattered(group, noises[group.name])
    for gain in gains:
        if gain.name in seeds:
            lines.append(f"- Budget, **{gain.name}**: {format_flops(gain.flops)} FLOPs on seed replicates, which "
                         "measure the noise.")
        elif gain.change is not None:
            bought = (f"lowered its criterion by {fmt.number(-gain.change)} from {gain.start_label}: "
                      f"{gain.per_nat} FLOPs per nat" if gain.change < 0 else
                      f"bought no improvement on {gain.start_label} ({fmt.delta(gain.change)})")
            lines.append(f"- Budget, **{gain.name}**: {format_flops(gain.flops)} FLOPs {bought}.")
    lines += next_steps(groups, noises, results, left_share)
    return lines + [""]


def fine_tuning_bought(results: list[StageResult]) -> list[str]:
    lines = []
    for result in results:
        if result.subject != FINE_TUNED or result.splits == ["val"]:
            continue
        diffs = result_differences(result)
        zero = [d for rows in diffs.values() for d in rows if d.reference == ZERO_SHOT and d.label == "MSE"]
        if zero:
            lines.append(f"- Fine-tuning, **{result.name}**{result.where}: against zero-shot the test MSE changed by "
                         + "; ".join(f"{_difference_text(d)} on {d.species}" for d in zero)
                         + f" ({LEVEL} % intervals over {zero[0].trajectories} trajectories).")
        behind = [(d.species, d.reference, d) for rows in diffs.values() for d in rows
                  if d.reference in result.baselines and d.label == "MSE" and d.new > d.old]
        if behind:
            lines.append(f"- Baselines, **{result.name}**{result.where}: the fine-tuned model's MSE is still above "
                         + "; ".join(f"{ref}'s on {species}, {_difference_text(d)}" for species, ref, d in behind)
                         + ".")
        elif any(d.reference in result.baselines for rows in diffs.values() for d in rows):
            lines.append(f"- Baselines, **{result.name}**{result.where}: the fine-tuned model's MSE is below every "
                         "baseline's on both species.")
    return lines


def settings_mattered(group: Group, noise: Noise) -> list[str]:
    ranked = ranking(group)
    if len(ranked) < 2 or group.varied == ["seed"] or group.record.get("search"):
        return []
    margin = ranked[1][1] - ranked[0][1]
    what = ", ".join(group.varied) or "the settings"
    if not noise.measured:
        return [f"- Settings, **{group.name}**: whether {what} mattered cannot be told: the margin "
                f"{fmt.delta(margin)} has no noise to be held against."]
    if margin <= noise.value:
        return [f"- Settings, **{group.name}**: {what} did not matter beyond the noise (margin {fmt.delta(margin)}, "
                f"noise {fmt.number(noise.value)})."]
    gaps = decomposition(group)
    runner = next((g for g in gaps if g.run is ranked[1][0]), None)
    where = (f", {fmt.delta(runner.at0 - gaps[0].at0)} of it already at step 0" if runner is not None else "")
    return [f"- Settings, **{group.name}**: {what} mattered (margin {fmt.delta(margin)}{where}, noise "
            f"{fmt.number(noise.value)})."]


def next_steps(groups: list[Group], noises: dict[str, Noise], results: list[StageResult], left_share: str
               ) -> list[str]:
    lines = []
    for group in groups:
        ranked = ranking(group)
        if len(ranked) < 2:
            continue
        winner = ranked[0][0]
        for key in (k for k in group.varied if k in ORDERED):
            values = sorted({r.config.get(key) for r in group.runs if isinstance(r.config.get(key), (int, float))})
            if len(values) >= 2 and winner.config.get(key) in (values[0], values[-1]):
                edge = "highest" if winner.config.get(key) == values[-1] else "lowest"
                lines.append(f"- Next, **{group.name}**: the winner `{winner.short_name(group.home)}` has the {edge} "
                             f"{key} tried: the best {key} may lie beyond it.")
    trained = [g for g in groups if g.runs]
    if trained:
        last = trained[-1]
        best = ranking(last)[0][0] if ranking(last) else last.runs[0]
        if best.best_step is not None and best.val and best.best_step == best.val[-1][0] and best.best_step > 0:
            lines.append(f"- Next, **{last.name}**: `{best.short_name(last.home)}`'s validation loss was lowest at "
                         f"its last evaluation ({fmt.loss(best.best_val)}): it was still falling; more steps may "
                         "lower it further.")
    unmeasured = [g.name for g in groups if not noises[g.name].measured and len(ranking(g)) > 1]
    if unmeasured:
        lines.append(f"- Next, **{', '.join(unmeasured)}**: no noise measured on its criterion: rerun a stage's "
                     "winner at another `seed` (a stage of its own) to measure the noise its margins are held against.")
    for result in results:
        vague = [d for rows in result_differences(result).values() for d in rows
                 if d.label == "MSE" and d.distinguishable is False]
        if vague and str(result.summary.get("selection", "")).startswith("first "):  # a part of its split: more left
            lines.append(f"- Next, **{result.name}**{result.where}: the MSE against "
                         + ", ".join(sorted({d.reference for d in vague}))
                         + f" is not distinguishable over {vague[0].trajectories} trajectories: forecast more of "
                         "them to tell.")
    lines.append(f"- Budget left: {left_share} of the budget (table \"Budget\").")
    return lines
