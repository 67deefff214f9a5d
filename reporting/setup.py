"""What the study was run on, at the top of the report: the first line names the model(s) and the data (and, for
the shipped stand-in bases, what they stand in for); the Setup section holds the model's architecture (from the
config a run recorded, beside Qwen2.5-0.5B's) and an LLMTIME example: one context's text and its tokens, the
scaler fitted on it, and the split's sizes."""
from __future__ import annotations

from pathlib import Path

from . import format as fmt
from .results import StageResult
from .runs import RunInfo

REAL_MODEL = "Qwen2.5-0.5B"
STAND_INS = ("series-tiny", "lv-tiny")  # the shipped bases (models/, models.recipe.RECIPES)
EXAMPLE_STEPS = 3  # steps of the example context shown as text and tokens
ARCHITECTURE = (("hidden_size", "hidden size"), ("num_hidden_layers", "layers"),
                ("num_attention_heads", "query heads"), ("num_key_value_heads", "key/value heads"),
                ("head_dim", "head dimension"), ("intermediate_size", "MLP size"), ("vocab_size", "vocabulary"),
                ("tie_word_embeddings", "tied embeddings"), ("rope_theta", "RoPE theta"),
                ("max_position_embeddings", "max positions"))


def model_names(runs: list[RunInfo], results: list[StageResult]) -> list[str]:
    """The base models of the runs and of the plain-model forecasts, as given (a path, a hub id, "tiny")."""
    names = [str(r.config.get("model")) for r in runs] + [r.model for r in results if r.model]
    return list(dict.fromkeys(n for n in names if n and n != "None"))


def describe_model(name: str) -> str:
    base = Path(name).name
    if base in STAND_INS:
        return f"{base} (a stand-in for {REAL_MODEL})"
    return "the random tiny preset (tests only)" if name == "tiny" else base


def data_files(studies: list[tuple[Path, dict]], runs: list[RunInfo], results: list[StageResult]) -> list[tuple]:
    """(path or None for the built-in simulated set, sha256 or None, the studies that used those bytes) of every data
    file the report covers: the studies' "data" records, else the runs' configs, else the forecasts'. A path whose
    contents changed between studies is listed once per sha256, each with its studies."""
    found = []
    for path, study in studies:
        items = study.get("data") if isinstance(study.get("data"), list) else []
        found += [(item.get("path"), item.get("sha256"), str(study.get("name") or path.parent.name))
                  for item in items if isinstance(item, dict)
                  and all(isinstance(item.get(k), (str, type(None))) for k in ("path", "sha256"))]
    for run in runs:
        found.append((run.config.get("data"), run.config.get("data_sha256"), None))
    for result in results:
        if isinstance(result.summary.get("data"), str) or not found:
            found.append((result.summary.get("data"), None, None))
    merged: dict = {}
    for path, sha, study in found:
        shas = merged.setdefault(str(path) if path else None, {})
        studies_of = shas.setdefault(sha, [])
        if study and study not in studies_of:
            studies_of.append(study)
    listed = []
    for path, shas in merged.items():
        known = {sha: names for sha, names in shas.items() if sha}
        listed += [(path, sha, names) for sha, names in (known or shas).items()]
    return listed


def describe_data(path: str | None) -> str:
    return Path(path).name if path else "the built-in simulated Lotka-Volterra set"


def title(runs: list[RunInfo], results: list[StageResult], data: list[tuple]) -> str:
    """The report's first line: which model(s), fine-tuned how, on which data."""
    models = ", ".join(describe_model(m) for m in model_names(runs, results)) or "no model"
    how = ("fine-tuned in full" if runs and all(r.config.get("full") for r in runs) else
           "fine-tuned with LoRA" if runs else "forecasting zero-shot")
    names = dict.fromkeys(describe_data(p) for p, *_ in data)
    return f"# Report: {models} {how} on {', '.join(names) or 'no data'}"


def overview(runs_dir: Path, runs: list[RunInfo], results: list[StageResult], unreadable: list[str],
             data: list[tuple], gqa: str) -> list[str]:
    plain = sum(r.run_dir is None for r in results)
    lines = [f"Runs directory `{runs_dir}`: {len(runs)} training run{'s' * (len(runs) != 1)}, {len(results)} "
             f"forecast{'s' * (len(results) != 1)} ({len(results) - plain} of trained runs, {plain} of base models), "
             f"{len(unreadable)} unreadable. Counting convention: gqa={gqa}; backward = 2 x forward; evaluation = "
             "forward with loss; forecasts = prefill once per prompt + every KV-cache decode step.", ""]
    changed = {path for path, *_ in data if sum(p == path for p, *_ in data) > 1}  # its bytes changed between studies
    for path, sha, studies in data:
        used = f", study {', '.join(studies)}" if path in changed and studies else ""
        lines.append(f"- Data: {f'`{path}`' if path else describe_data(path)}"
                     + (f" (sha256 `{sha[:16]}`{used})" if sha else "") + ".")
    for name in model_names(runs, results):
        if Path(name).name in STAND_INS:
            lines.append(f"- Model: `{name}`, one of the shipped pretrained bases: a small Qwen2-architecture model "
                         f"(its README and recipe.json say how it was made) that stands in for {REAL_MODEL}, so the "
                         "study runs on a CPU in minutes; its numbers are not those of the real model.")
        else:
            lines.append(f"- Model: `{name}`.")
    return lines + [""]


def architecture(runs: list[RunInfo]) -> list[str]:
    """The model's architecture from a run's recorded config, beside Qwen2.5-0.5B's."""
    from lora import lora_model_on_meta
    from qwen_mini.config import QwenConfig

    configs = {}
    for run in runs:
        if isinstance(run.config.get("model_config"), dict):
            configs.setdefault(run.model_name, (run.config["model_config"], run.config.get("total_params")))
    if not configs:
        return []
    real = QwenConfig.from_name("qwen2.5-0.5b").to_hf()
    real_params = sum(p.numel() for p in lora_model_on_meta(QwenConfig.from_hf(real), 0).parameters())
    names = list(configs)[:8]
    rows = [[label] + [fmt.setting(configs[n][0].get(key)) for n in names] + [fmt.setting(real.get(key))]
            for key, label in ARCHITECTURE]
    rows.append(["parameters"] + [f"{configs[n][1]:,}" if isinstance(configs[n][1], int) else "-" for n in names]
                + [f"{real_params:,}"])
    return ["### The model", "", "From the config each run recorded, beside the model it stands in for:", ""] + \
        fmt.table(["", *names, REAL_MODEL], rows) + [""]


def llmtime_example(runs: list[RunInfo], results: list[StageResult]) -> list[str]:
    """One context of the data as the model reads it: its text, its tokens, the scaler, and the split's sizes."""
    from data.dataset import make_eval_example
    from data.llmtime import DEFAULT_SCALER, scaling_rule
    from data.lotka_volterra import load_or_simulate

    run = next((r for r in runs if isinstance(r.config.get("split"), dict)
                and all(isinstance(r.config["split"].get(k), list) for k in ("train", "val", "test"))), None)
    if run is None:
        return []
    config, split = run.config, run.config["split"]
    context = next((r.summary.get("protocol_settings", {}).get("context") for r in results
                    if isinstance(r.summary.get("protocol_settings"), dict)), None) or config.get("fit_steps") or 50
    decimals = int(config.get("decimals", 2))
    lines = ["### The data as the model reads it (LLMTIME)", ""]
    sizes = {k: len(split[k]) for k in ("train", "val", "test")}
    lines += [f"Split ({split.get('mode', '?')}, by trajectory): {sizes['train']} train, {sizes['val']} validation, "
              f"{sizes['test']} test trajectories; a run trains on windows of `ctx` tokens of whole training "
              f"trajectories, each scaled on its first {config.get('fit_steps', context)} steps; a forecast reads "
              f"the first {context} steps of a test trajectory and continues it.", ""]
    try:
        data = load_or_simulate(config.get("data"))
        index = int((split.get("test") or [0])[0])
        rule = scaling_rule(config.get("scaler") or DEFAULT_SCALER)  # the run's (runs before the setting: p95)
        example = make_eval_example(data.trajectories[index], index, int(context),
                                    data.trajectories.shape[1] - int(context), decimals, rule)
    except (OSError, ValueError, IndexError, KeyError, TypeError) as e:
        return lines + [f"(No example: the data could not be read here: {e}.)", ""]
    text = ";".join(example.prompt.split(";")[:EXAMPLE_STEPS]) + ";"
    lines += [f"Trajectory {index}: scaler {rule.name}, {rule.describe()} (over the {context} context steps only), "
              f"written with {decimals} decimals, species joined by \",\" and steps by \";\":", ""]
    lines += fmt.table(["", "prey", "predator"][:1 + example.scaler.n_vars],
                       [["scale"] + [fmt.number(v) for v in example.scaler.scale],
                        ["first step"] + [fmt.number(v) for v in example.context[0]],
                        ["as text"] + example.prompt.split(";")[0].split(",")]) + [""]
    tokenizer = _tokenizer(config)
    lines += ["```", f"text of the first {EXAMPLE_STEPS} steps: {text}"]
    if tokenizer is not None:
        ids = tokenizer.encode(text)
        lines += [f"tokens: {[tokenizer.id_to_token(i) for i in ids]}", f"ids:    {ids}",
                  f"the whole {context}-step prompt: {len(example.prompt)} characters, "
                  f"{len(tokenizer.encode(example.prompt))} tokens"]
    else:
        lines.append(f"(the tokens need {config.get('model')}'s tokenizer, which is not on this machine)")
    return lines + ["```", ""]


def _tokenizer(config: dict):
    """The run's tokenizer when it is on this machine (the tiny preset's, or a local model directory's)."""
    from qwen_mini.tokenizer import Tokenizer, char_tokenizer

    if config.get("model") == "tiny":
        return char_tokenizer()
    for where in (config.get("model_dir"), config.get("model")):
        if where and (Path(str(where)) / "tokenizer.json").is_file():
            try:
                return Tokenizer.from_pretrained(Path(str(where)))
            except (OSError, ValueError):
                return None
    return None


def setup_section(runs: list[RunInfo], results: list[StageResult]) -> list[str]:
    lines = architecture(runs) + llmtime_example(runs, results)
    return (["## Setup", ""] + lines) if lines else []

