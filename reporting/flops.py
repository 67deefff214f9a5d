"""The report's Budget and FLOP sections, in the style of the coursework reports: the ledger against the budget
(budget.png on a log axis), the counting rules as a table, the FLOPs of one training step per model component for
every distinct setting of the runs, the FLOPs of each stage in the study's order with what they bought, every
ledger record, and how our count relates to the five seed reports' counts (what each includes or leaves out, from
their own FLOP sections)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lora
from ledger import KINDS, Record, record_label, totals
from qwen_mini.config import QwenConfig
from qwen_mini.flop_report import BACKWARD_FACTOR, FlopReport, format_flops
from qwen_mini.flops import COSTS, count_forward

from . import format as fmt
from .figures import plot_budget
from .results import moved_out

# Component groups of the per-step table, in model order: (label, test on FlopReport.by_component's key).
COMPONENTS = (
    ("embedding (lookup)", lambda k: k.startswith("embed_tokens")),
    ("rotary tables + rotation of q, k", lambda k: k.startswith("rotary_emb") or k.startswith("self_attn.rope_")),
    ("LoRA (A, B, scaling, add)", lambda k: ".lora_" in k),
    ("q projection", lambda k: k.startswith("self_attn.q_proj")),
    ("k projection", lambda k: k.startswith("self_attn.k_proj")),
    ("v projection", lambda k: k.startswith("self_attn.v_proj")),
    ("attention scores Q.K^T + scale", lambda k: k in ("self_attn.scores", "self_attn.scale")),
    ("attention softmax", lambda k: k == "self_attn.softmax"),
    ("attention values P.V", lambda k: k == "self_attn.values"),
    ("o projection", lambda k: k.startswith("self_attn.o_proj")),
    ("MLP (gate, up, SiLU, down)", lambda k: k.startswith("mlp.")),
    ("RMSNorms", lambda k: "layernorm" in k or k.startswith("norm.")),
    ("residual adds", lambda k: k.startswith("residual")),
    ("LM head", lambda k: k.startswith("lm_head")),
    ("loss (cross-entropy)", lambda k: k.startswith("loss")),
)

RULES = (
    ("matrix product (m x n).(n x p)", "m p (2n - 1): n multiplies, n - 1 adds per output (about 2mnp); + m p for "
                                       "a bias"),
    ("primitives", ", ".join(f"{name} {cost}" for name, cost in COSTS.items())),
    ("backward pass", f"{BACKWARD_FACTOR} x the forward of every operation; a training step = 3 x forward"),
    ("LoRA on a projection", "base product + x.A (rank r) + (xA).B + one multiply by alpha/r and one add per output"),
    ("attention", "per query head over the full T x T scores: Q.K^T, one scale multiply per score, softmax = T exp "
                  "+ (T - 1) adds + T divisions per row, then P.V"),
    ("grouped-query k/v", "gqa=real: k/v at the model's key/value heads; gqa=mha: as wide as the query heads (the "
                          "coursework convention)"),
    ("RMSNorm (width d)", "4d + 12 per row: squares, mean, + eps, sqrt, inverse, normalise, weight"),
    ("SwiGLU", "SiLU = negate + exp + add + divide per element; gate x up one multiply"),
    ("LM head + loss", "over batch x (ctx - 1) positions (the last has no next token); cross-entropy V exp + (V - 1) "
                       "adds + log + subtract per position"),
    ("validation", "the forward of a step with its loss, no backward"),
    ("forecasting", "prefill once per prompt (LM head on its last position), then every KV-cache decode step over "
                    "the grammar's candidate tokens"),
    ("left out", "the embedding lookup (a gather), the causal mask (a select), the softmax max-subtraction, the "
                 "optimizer update, sampling and grammar masks, tokenisation and data movement"),
)


@dataclass(frozen=True)
class StepSetting:
    """What a training step's FLOPs depend on."""
    model: str
    model_config: str  # its config as sorted JSON (the key that tells two models apart)
    batch: int
    ctx: int
    rank: int  # 0: full fine-tuning
    alpha: float | None
    targets: tuple[str, ...]
    dropout: float

    @property
    def label(self) -> str:
        lora_part = "full" if not self.rank else f"r{self.rank} {','.join(self.targets)}"
        return f"{self.model} b{self.batch} x ctx {self.ctx}, {lora_part}"


def step_setting(config: dict) -> StepSetting | None:
    """The setting of a run's config.json, or None if it lacks what a count needs."""
    import json

    if not isinstance(config.get("model_config"), dict):
        return None
    return StepSetting(str(config.get("model", "?")).rstrip("/").split("/")[-1],
                       json.dumps(config["model_config"], sort_keys=True), int(config.get("batch", 0)),
                       int(config.get("ctx", 0)), 0 if config.get("full") else int(config.get("rank", 0)),
                       config.get("alpha"), tuple(config.get("targets") or ()), float(config.get("lora_dropout") or 0))


def count_setting(setting: StepSetting, gqa: str) -> FlopReport:
    import json

    model = lora.lora_model_on_meta(QwenConfig.from_hf(json.loads(setting.model_config)), setting.rank,
                                    setting.alpha, setting.targets, setting.dropout)
    return count_forward(model, setting.batch, setting.ctx, gqa=gqa)


def component_steps(report: FlopReport) -> dict[str, int]:
    """FLOPs of one training step (forward + backward) per component group; every row lands in exactly one."""
    steps = dict.fromkeys((label for label, _ in COMPONENTS), 0)
    for key, forward in report.by_component().items():
        label = next((label for label, test in COMPONENTS if test(key)), None)
        if label is None:
            raise ValueError(f"FLOP row {key!r} belongs to no component of the report's table")
        steps[label] += (1 + BACKWARD_FACTOR) * forward
    return steps


SETTINGS_PER_TABLE = 4  # columns of settings in one component table (printable)


def component_table(settings: list[StepSetting], gqa: str) -> list[str]:
    """One row per component, one column per setting: FLOPs per training step and share of the step; settings
    past SETTINGS_PER_TABLE continue in another table."""
    reports = [count_setting(s, gqa) for s in settings]
    columns = [component_steps(r) for r in reports]
    lines = [f"FLOPs of one training step (forward + backward) per component, attention counted as gqa={gqa} "
             f"({reports[0].gqa_description()}):", ""]
    for start in range(0, len(settings), SETTINGS_PER_TABLE):
        part = slice(start, start + SETTINGS_PER_TABLE)
        rows = [[label] + [f"{format_flops(c[label], 4)} ({100 * c[label] / r.step:.2f} %)" if c[label] else "0"
                           for c, r in zip(columns[part], reports[part])] for label, _ in COMPONENTS]
        rows.append(["**per step**"] + [f"**{format_flops(r.step, 4)}**" for r in reports[part]])
        lines += fmt.table(["component"] + [s.label for s in settings[part]], rows) + [""]
    return lines[:-1]


def reconciliation(gqa_used: str) -> list[str]:
    """How the seed reports' per-step counts relate to ours, at their common setting (Qwen2.5-0.5B, batch 4 x 512,
    LoRA on q, v: r4, except seed 002, whose per-step figure is at r8), from what their own FLOP sections list."""
    def count(rank: int):
        return count_setting(StepSetting("Qwen2.5-0.5B", _qwen05_config(), 4, 512, rank, None, ("q_proj", "v_proj"),
                                         0.0), "mha")
    report, report_r8 = count(4), count(8)
    parts = component_steps(report)
    lm_head, mlp, loss = parts["LM head"], parts["MLP (gate, up, SiLU, down)"], parts["loss (cross-entropy)"]
    rotary = parts["rotary tables + rotation of q, k"]
    qkv = sum(parts[k] for k in ("q projection", "k projection", "v projection"))
    share = lambda flops: f"{100 * flops / report.step:.1f} %"
    small_share = lambda flops: f"{100 * flops / report.step:.2f} %"
    return [
        f"The seed reports count one step of Qwen2.5-0.5B at batch 4 x 512 with LoRA on q, v, at r4 (seed 002 at r8); "
        f"ours, counted the way they count attention (gqa=mha), is {format_flops(report.step, 4)} FLOPs at r4, "
        f"{format_flops(report_r8.step, 4)} at r8 (this study's tables use gqa={gqa_used}):", "",
        "| seed | its count vs ours | what its FLOP section includes or leaves out |", "|---|---|---|",
        f"| 000, 004 | within 0.2 % | the same rules as ours (matmul m p (2n - 1), backward 2 x forward, k/v as "
        f"multi-head) over RMSNorm, SwiGLU, LoRA and the LM head; where we count rotary (tables and rotation of q, k: "
        f"{small_share(rotary)} of a step) they add a sinusoidal positional encoding, n x d additions, and they list "
        f"no loss (ours: {small_share(loss)}) |",
        f"| 001 | 29 % lower | §4.3 counts embeddings, multi-head attention, RMSNorm (4d + 11), SwiGLU and LoRA on "
        f"q, v, says positional encodings are not included, and lists no LM head: ours spends {share(lm_head)} of a "
        "step there, most of the gap |",
        f"| 002 | 12 % lower (at its r8) | its appendix lists every term we count, LM head as 2 B S H V included, yet "
        f"states 1.98e12 forward at r8; our forward at r8 is {format_flops(report_r8.forward, 3)}, short by about half "
        f"of our LM head ({format_flops(lm_head // 6, 3)} forward): its total looks like the LM head counted once as "
        "B S H V |",
        f"| 003 | less than half | §2.1.2 counts q, k, v per head as (D/H) x (D/H) products (1/14 of the real "
        f"D x D; ours: {share(qkv)} of a step), §2.1.6 writes the MLP projections as 2ND(2N - 1) with N the tokens "
        f"where M = 4864 belongs (ours: {share(mlp)}), RoPE is left out and no LM head is listed |", ""]


def _qwen05_config() -> str:
    import json

    return json.dumps(QwenConfig.from_name("qwen2.5-0.5b").to_hf(), sort_keys=True)


# ---- the sections --------------------------------------------------------------------------------------------------

def stage_flops(records: list[Record], runs_dir: Path, studies: list[tuple[Path, dict]]) -> dict[str, int]:
    """FLOPs per study stage in the plan's order (training and validation by the directory a run sits in, each
    forecast by the directory it wrote into), then per record outside any study."""
    stage_dirs = {}
    for path, study in studies:
        for stage in study.get("stages", []):
            if isinstance(stage, dict) and isinstance(stage.get("name"), str):
                stage_dirs[(path.parent / stage["name"]).resolve()] = f"{study.get('name', path.parent.name)}/" \
                                                                      f"{stage['name']}"
    flops = dict.fromkeys(stage_dirs.values(), 0)

    def stage_of(where: Path, record: Record) -> str:
        where = where.resolve()
        return next((name for d, name in stage_dirs.items() if where == d or d in where.parents),
                    record_label(record, runs_dir))

    for record in records:
        home = stage_of(record.run_dir, record)
        booked = 0
        for entry in record.forecasts:
            if isinstance(entry, dict) and entry.get("out") and isinstance(entry.get("flops"), int):
                name = stage_of(Path(moved_out(entry, record, runs_dir)), record)
                flops[name] = flops.get(name, 0) + entry["flops"]
                booked += entry["flops"]
        flops[home] = flops.get(home, 0) + record.flops_used - min(booked, record.by_kind["forecast"])
    return {name: f for name, f in flops.items() if f}


def budget_section(records: list[Record], group_flops: dict[str, int], budget: int, figures: Path,
                   out: Path) -> list[str]:
    t = totals(records)
    lines = ["## Budget", ""] + fmt.table(
        ["", "train", "eval", "forecast", "total", "reserved", "budget", "left"],
        [["FLOPs", *(format_flops(t.by_kind[k]) for k in KINDS), format_flops(t.spent), format_flops(t.outstanding),
          format_flops(budget), format_flops(budget - t.committed)],
         ["share of budget", *(fmt.share(t.by_kind[k], budget) for k in KINDS), fmt.share(t.spent, budget),
          fmt.share(t.outstanding, budget), "100 %", left_share(records, budget)]]) + [""]
    if t.spent > budget:
        lines += [f"**OVER BUDGET by {format_flops(t.spent - budget)} FLOPs.**", ""]
    by_kind = {**{k: t.by_kind[k] for k in KINDS}, **({"reserved": t.outstanding} if t.outstanding else {})}
    return lines + [fmt.image(plot_budget(figures / "budget.png", by_kind, group_flops, budget), out,
                              "the ledger on a log axis"), ""]


def left_share(records: list[Record], budget: int) -> str:
    return fmt.share(budget - totals(records).committed, budget)


def flop_section(settings: list[StepSetting], records: list[Record], runs_dir: Path, gains: list, budget: int,
                 gqa: str) -> list[str]:
    """`gains`: per stage (study order) its FLOPs and what they bought (findings.StageGain)."""
    lines = ["## FLOPs", "", f"Attention convention of every count here: gqa={gqa}.", ""]
    lines += fmt.table(["rule", "count"], [[rule, text] for rule, text in RULES]) + [""]
    if settings:
        lines += component_table(settings, gqa) + [""]
    lines += ["FLOPs per stage, in the study's order (study stage, else record), and what each training stage "
              "bought: its winner's score under the stage's criterion against where the stage started (step 0, or "
              "the winner of the stage it started from):", ""]
    lines += fmt.table(["stage", "FLOPs", "% of budget", "starts from", "start", "best", "change",
                        "FLOPs per nat of change"],
                       [[g.name, format_flops(g.flops), fmt.share(g.flops, budget), g.start_label or "-",
                         fmt.loss(g.start), fmt.loss(g.best), fmt.delta(g.change), g.per_nat] for g in gains])
    lines += ["", "FLOPs per record of the ledger (every run and forecast), in the study's order:", ""]
    order = {g.name: i for i, g in enumerate(gains)}
    ranked = sorted(records, key=lambda r: (min((i for name, i in order.items()
                                                 if record_label(r, runs_dir).startswith(name + "/")
                                                 or record_label(r, runs_dir) == name), default=len(order)),
                                            record_label(r, runs_dir)))
    lines += fmt.table(["record", "train FLOPs", "eval FLOPs", "forecast FLOPs", "total", "% of budget"],
                       [[record_label(r, runs_dir), *(format_flops(r.by_kind[k]) for k in KINDS),
                         format_flops(r.flops_used), fmt.share(r.flops_used, budget)] for r in ranked])
    return lines + [""] + reconciliation(gqa)
