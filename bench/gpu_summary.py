"""summary.md of a bench/gpu_check.py run: which of issue 36's goals is met and which falls short (or was not
measured, and why), then each part's numbers, read from the parts' JSON files in OUT."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from bench.gpu_parts import GPU, MODES, PARTS

SUMMARY_NAME, LOG_NAME = "summary.md", "log.txt"
MFU_GOAL = 0.40  # bf16 LoRA step at the goal's ctx (768), executed FLOPs over the bf16 GEMM peak
FP16_GOAL = 0.90  # fp16 step tokens/s over the bf16 step's: within 10 %
FORECAST_GOAL = 3.0  # our forecasting tokens/s over HF generate's
DECODE_GOAL = 1000.0  # batch-1 decode tokens/s, compiled


@dataclass(frozen=True)
class Goal:
    goal: str
    measured: str
    verdict: str  # "met", "falls short" or "not measured"


def read_part(path: Path, name: str) -> dict:
    """A part's file: a JSON object of that part with a list of cases; ValueError naming the file otherwise."""
    try:
        part = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a part's JSON ({e})") from None
    if not isinstance(part, dict) or part.get("part") != name or not isinstance(part.get("cases", []), list) \
            or not all(isinstance(c, dict) for c in part.get("cases", [])):
        raise ValueError(f"{path}: not the {name} part's JSON (an object with \"part\": \"{name}\" and a list of "
                         "cases)")
    return part


def load_parts(out: Path) -> dict[str, dict]:
    """part name -> its JSON, for the parts whose file is in OUT; one that cannot be read is a part that failed,
    its error naming the file (gpu_check.py refuses such a file before any part runs; this is for one damaged
    since)."""
    parts = {}
    for name in PARTS:
        path = out / f"{name}.json"
        if path.is_file():
            try:
                parts[name] = read_part(path, name)
            except ValueError as e:
                parts[name] = {"part": name, "status": "failed", "error": str(e), "cases": []}
    return parts


def ok_cases(part: dict | None, **match) -> list[dict]:
    return [c for c in (part or {}).get("cases", []) if c.get("status") == "ok"
            and all(c.get(k) == v for k, v in match.items())]


def why_missing(part: dict | None, name: str, **match) -> str:
    """Why no number: the part not run, skipped or stopped, or the case's own status and error."""
    if part is None:
        return f"not measured: the {name} part did not run"
    cases = [c for c in part.get("cases", []) if all(c.get(k) == v for k, v in match.items())]
    if not cases:
        return f"not measured: {name} part {part.get('status', '?')}" + (
            f" ({part['reason']})" if part.get("reason") else f" ({part['error']})" if part.get("error") else "")
    case = cases[0]
    return f"not measured: case {case['status']}" + (f" ({case['error']})" if case.get("error") else
                                                     f" ({case['reason']})" if case.get("reason") else "")


def goals(parts: dict[str, dict]) -> list[Goal]:
    """The four goals of issue 36, each with what was measured and its verdict."""
    mode = MODES[next((p["mode"] for p in parts.values() if p.get("mode") in MODES), GPU.name)]
    ctx, train, forecast = mode.train_ctxs[0], parts.get("train"), parts.get("forecast")
    result = []

    label = f"bf16 LoRA step >= {MFU_GOAL:.0%} MFU at ctx {ctx}"
    steps = {c["compile"]: c["mfu"] for c in ok_cases(train, ctx=ctx, dtype="bfloat16", impl="ours")
             if c.get("mfu") is not None}
    if steps:
        text = ", ".join(f"{'compiled' if compiled else 'eager'} {mfu:.1%}" for compiled, mfu in sorted(steps.items()))
        result.append(Goal(label, text, verdict(max(steps.values()) >= MFU_GOAL)))
    elif ok_cases(train, ctx=ctx, dtype="bfloat16", impl="ours"):
        result.append(Goal(label, "not measured: no bf16 GEMM peak (the machine part did not measure one)",
                           "not measured"))
    else:
        result.append(Goal(label, why_missing(train, "train", ctx=ctx, dtype="bfloat16", impl="ours"),
                           "not measured"))

    label = f"fp16 + GradScaler step within {1 - FP16_GOAL:.0%} of bf16 (tokens/s)"
    ratios = {}
    for each in mode.train_ctxs:
        speed = {c["dtype"]: c["tokens_per_s"] for c in ok_cases(train, ctx=each, impl="ours", compile=False)}
        if "float16" in speed and "bfloat16" in speed:
            ratios[each] = speed["float16"] / speed["bfloat16"]
    if ratios:
        text = ", ".join(f"ctx {c}: fp16 {r:.2f}x bf16's tokens/s" for c, r in ratios.items())
        result.append(Goal(label, text, verdict(min(ratios.values()) >= FP16_GOAL)))
    else:
        result.append(Goal(label, why_missing(train, "train", dtype="float16", impl="ours"), "not measured"))

    label = f"forecasting >= {FORECAST_GOAL:.0f}x HF generate (tokens/s, each its own tokens)"
    hf = ok_cases(forecast, workload="forecast", impl="hf")
    ours = {c["compile"]: c for c in ok_cases(forecast, workload="forecast", impl="ours")}
    if hf and ours:
        speedups = {compiled: c["tokens_per_s"] / hf[0]["tokens_per_s"] for compiled, c in ours.items()}
        text = ", ".join(f"{'compiled' if compiled else 'eager'} {s:.2f}x" for compiled, s in sorted(speedups.items()))
        incomplete = [c for c in (*hf, *ours.values()) if c.get("complete_rows") != c.get("rows")]
        text += f" (HF {hf[0]['tokens_per_s']:,.0f} tokens/s)" + (
            "; some rows are not complete forecasts" if incomplete else "")
        result.append(Goal(label, text, verdict(max(speedups.values()) >= FORECAST_GOAL)))
    else:
        missing = ("hf", hf) if not hf else ("ours", ours)
        result.append(Goal(label, why_missing(forecast, "forecast", workload="forecast", impl=missing[0]),
                           "not measured"))

    label = f"batch-1 decode >= {DECODE_GOAL:,.0f} tokens/s compiled"
    decode = {c["compile"]: c["tokens_per_s"] for c in ok_cases(forecast, workload="decode1", impl="ours")}
    if True in decode:
        text = f"compiled {decode[True]:,.0f} tokens/s" + (f" (eager {decode[False]:,.0f})" if False in decode else "")
        result.append(Goal(label, text, verdict(decode[True] >= DECODE_GOAL)))
    else:
        result.append(Goal(label, why_missing(forecast, "forecast", workload="decode1", impl="ours", compile=True),
                           "not measured"))
    return result


def verdict(met: bool) -> str:
    return "met" if met else "falls short"


def fmt(value, spec: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(value * scale if scale != 1.0 else value, spec)


def table(header: str, rows: list[list[str]]) -> list[str]:
    """A Markdown table: `header` as "name|>name|..." (">": a right-aligned number column), then the rows."""
    names = header.split("|")
    return ["| " + " | ".join(n.lstrip(">") for n in names) + " |",
            "|" + "|".join("---:" if n.startswith(">") else "---" for n in names) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def status_text(case: dict) -> str:
    return case["status"] + (f": {case['error']}" if case.get("error") else "")


def summary_markdown(parts: dict[str, dict], wall_s: float, elapsed_s: float) -> str:
    machine = parts.get("machine", {})
    smoke = any(p.get("mode") == "cpu-smoke" for p in parts.values())
    title = "CPU smoke run" if smoke else (machine.get("gpu") or {}).get("name", "GPU check")
    lines = [f"# bench/gpu_check.py: {title}, {time.strftime('%Y-%m-%d')}", ""]
    if smoke:
        lines += ["**CPU smoke run on tiny configs: it proves that the script runs end to end; its numbers are not "
                  "measurements of the goals.**", ""]
    packages = machine.get("packages", {})
    version = {m: info.get("version") or "missing" for m, info in packages.items()}
    lines += [f"torch {machine.get('torch', '?')} (CUDA {machine.get('cuda')}), transformers "
              f"{version.get('transformers', '?')}, peft {version.get('peft', '?')}, Python "
              f"{machine.get('python', '?')}; wall {elapsed_s:.0f} s of a {wall_s:.0f} s limit.", ""]
    missing = [f"{m} ({info['used by']})" for m, info in packages.items() if info.get("version") is None]
    if missing:
        lines += [f"Not installed here: {', '.join(missing)}.", ""]
    if machine.get("nvidia_smi"):
        lines += ["Card as found:", "```", machine["nvidia_smi"], "```", ""]
    lines += ["## Goals", ""] + table("goal|measured|verdict",
                                      [[g.goal, g.measured, f"**{g.verdict}**"] for g in goals(parts)])
    lines += ["", "## Parts", ""] + table("part|status|>seconds|>timeout s|>cases ok|note",
                                          [part_row(name, parts.get(name)) for name in PARTS])
    lines += machine_section(machine) + train_section(parts.get("train")) + forecast_section(parts.get("forecast"))
    lines += jobs_section(parts.get("jobs")) + pytest_section(parts.get("pytest_gpu"))
    return "\n".join(lines) + "\n"


def part_row(name: str, part: dict | None) -> list[str]:
    if part is None:
        return [name, "not run", "", "", "", ""]
    cases = part.get("cases", [])
    note = part.get("reason") or part.get("error") or "; ".join(
        f"{case_label(c)}: {c['status']}" for c in cases if c.get("status") not in ("ok", "passed", "skipped"))
    ok = sum(c.get("status") in ("ok", "passed") for c in cases)
    return [name, part.get("status", "?"), fmt(part.get("seconds"), ".0f"), fmt(part.get("timeout_s"), ".0f"),
            f"{ok}/{len(cases)}", note[:300]]


def case_label(case: dict) -> str:
    keys = ("dtype", "ctx", "impl", "workload", "compile", "check", "test")
    return " ".join(str(case[k]) if k != "compile" else "compiled" for k in keys if case.get(k) not in (None, False))


def machine_section(machine: dict) -> list[str]:
    rows = []
    for c in machine.get("cases", []):
        if c.get("status") != "ok":
            rows.append([c["dtype"], status_text(c), "", "", ""])
            continue
        mlp = max(c["mlp_gflops"].values())
        rows.append([c["dtype"], f"{fmt(c['square_gflops'], '.4g', 1e-3)} (n={c['square_size']})",
                     fmt(mlp, ".4g", 1e-3), fmt(c["peak_gflops"], ".4g", 1e-3), fmt(c["bandwidth_gbs"], ".0f")])
    if not rows:
        return []
    return ["", "## Machine limits (this run)", ""] + table(
        "dtype|>square GEMM TFLOP/s|>MLP shapes TFLOP/s|>peak used for MFU|>copy GB/s", rows)


def train_section(train: dict | None) -> list[str]:
    if not train or not train.get("cases"):
        return []
    hf = {(c["ctx"], c["dtype"]): c for c in ok_cases(train, impl="hf")}
    rows = []
    for c in train["cases"]:
        other = hf.get((c["ctx"], c["dtype"])) if c["impl"] == "ours" and c.get("step_s") else None
        rows.append([str(c["ctx"]), c["dtype"], c["impl"] + (" compiled" if c.get("compile") else ""),
                     fmt(c.get("step_s"), ".1f", 1e3), fmt(c.get("tokens_per_s"), ",.0f"),
                     fmt(c.get("tflops_per_s"), ".3g"), fmt(c.get("mfu"), ".1%"), fmt(c.get("peak_gib"), ".2f"),
                     fmt(c.get("task_gib"), ".2f"), fmt(c["step_s"] / other["step_s"] if other else None, ".2f"),
                     status_text(c)])
    kind = next((c["peak_kind"] for c in train["cases"] if c.get("peak_kind")), "?")
    return ["", f"## LoRA training steps (batch {train.get('batch')}, r{train.get('rank')} on {train.get('targets')}; "
            f"compile: {train.get('compile_backend')})", ""] + table(
        ">ctx|dtype|impl|>step ms|>tokens/s|>TFLOP/s|>MFU|>peak GiB|>task GiB|>time ours/HF|status", rows) + [
        "", f"MFU: the FLOPs the step executes (forward, input gradients, the adapters' weight gradients) per second "
        f"over the dtype's GEMM peak above. Peak: {kind}; task: the peak above what the loaded model held."]


def forecast_section(f: dict | None) -> list[str]:
    if not f or not f.get("cases"):
        return []
    hf = {c["workload"]: c for c in ok_cases(f, impl="hf")}
    rows = []
    for c in f["cases"]:
        other = hf.get(c["workload"]) if c["impl"] == "ours" and c.get("tokens_per_s") else None
        rows.append([c["workload"], c["impl"] + (" compiled" if c.get("compile") else ""),
                     fmt(c.get("seconds"), ".2f"), fmt(c.get("tokens"), ","), fmt(c.get("tokens_per_s"), ",.0f"),
                     fmt(c["tokens_per_s"] / other["tokens_per_s"] if other else None, ".2f"),
                     f"{c['complete_rows']}/{c['rows']}" if "rows" in c else "", fmt(c.get("peak_gib"), ".2f"),
                     status_text(c)])
    return ["", f"## Forecasting ({f.get('dtype')}; {f.get('trajectories')} trajectories x {f.get('samples')} "
            f"samples, {f.get('context_steps')} + {f.get('horizon_steps')} steps, tokenizer {f.get('tokenizer')}) and "
            f"batch-1 decoding ({f.get('decode_prompt_len')}-token prompt, {f.get('decode_new')} new tokens; "
            f"compile: {f.get('compile_backend')})", ""] + table(
        "workload|impl|>s|>tokens|>tokens/s|>tokens/s vs HF|>complete rows|>peak GiB|status", rows)


def jobs_section(jobs: dict | None) -> list[str]:
    if not jobs or not jobs.get("cases"):
        return []
    rows = [[c["check"], f"`{c['command']}`", c.get("expect", ""), fmt(c.get("exit_code"), "d"),
             ", ".join(f"{r['run']} on {r['device_used']} to step {r['last_step']}" for r in c.get("runs", [])),
             status_text(c)] for c in jobs["cases"]]
    return ["", "## train.py --plan as jobs", ""] + table("check|command|expected|>exit|runs|status", rows)


def pytest_section(pytest: dict | None) -> list[str]:
    if not pytest or "counts" not in pytest:
        return []
    counts = ", ".join(f"{n} {outcome}" for outcome, n in pytest["counts"].items())
    status = pytest.get("pytest_exit_code")
    lines = ["", f"## {pytest.get('command')}", "", f"{counts} (pytest's exit status {status}).", ""]
    for c in pytest["cases"]:  # what a test said: its failure or skip message, or the last line it printed
        said = c.get("message") if c["status"] != "passed" else " ".join((c.get("printed") or "").splitlines()[-1:])
        lines.append(f"- {c['test']}: {c['status']}" + (f" ({said.strip()[:200]})" if said.strip() else ""))
    return lines


def write_summary(out: Path, wall_s: float, elapsed_s: float) -> str:
    text = summary_markdown(load_parts(out), wall_s, elapsed_s)
    (out / SUMMARY_NAME).write_text(text)
    return text
