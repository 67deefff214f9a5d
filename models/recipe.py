"""The recipes of the shipped base models: small Qwen2-architecture models pretrained from scratch on series in
LLMTIME text, with the project's own tools.

    python -m models.recipe                     # series-tiny, the demo's base: runs/series-tiny-pretrain, then
                                                # models/series-tiny
    python -m models.recipe --model lv-tiny     # lv-tiny: runs/lv-tiny-pretrain, then models/lv-tiny
    python -m models.recipe --threads 1         # one torch thread (faster on a busy shared machine)

The bases (RECIPES), both of the `lv-tiny` preset's architecture and the character tokenizer:
  series-tiny  pretrained in two stages on broad synthetic series (data/synthetic.py: Gaussian-process draws from
               random kernel compositions, AR processes, sums of sinusoids, other ODE systems, classic Lotka-Volterra
               over a broad prior; in stage 2 also the users' model family, logistic prey and saturating predator,
               over a prior far broader than theirs): it knows what series and oscillating populations look like in
               LLMTIME text, but not the users' parameters, so zero-shot it forecasts their file about as well as
               seasonal naive and LoRA on their data has something to learn, as with a general pretrained model.
  lv-tiny      pretrained on the simulated Lotka-Volterra prior calibrated on the users' file
               (data/lotka_volterra.py `varied`): close to the users' data already zero-shot; kept for comparison.

The steps (each printed as the command it equals; run again after an interruption, the recipe continues where it
stopped: finished steps are kept, training resumes from its last checkpoint):
  1. init    the preset with random weights (torch seed `init_seed`) and the character tokenizer -> WORK/init:
             config.json, model.safetensors, tokenizer.json, tokenizer_config.json
  2. data    each data set: `python -m data.synthetic --n N --seed S --mix ... --out WORK/FILE` or
             `python -m data.lotka_volterra --simulate --n N --seed S --prior P --out WORK/FILE`
  3. train   python train.py --model MODEL --data WORK/FILE --full ... --runs-dir WORK --out WORK/RUN, per stage: the
             first from the random init, a later one from the one before on fresh data, its learning rate warmed up
             again (a longer schedule in several runs)
  4. export  the last stage's model -> models/NAME, plus README.md and recipe.json: the commands and settings,
             steps, tokens, FLOPs, wall time, the first steps' losses and the sha256 of model.safetensors
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.args import bounded
from common.exit_codes import EXIT_FAILED
from common.fileio import os_error_text, sha256_file
from data.series_families import predprey_prior_text

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--full", "--ctx", "1024", "--batch", "8", "--schedule", "cosine", "--dtype", "bfloat16", "--seed", "0",
          "--eval-every", "100", "--val-batches", "4", "--checkpoint-every", "100"]
FIRST_STEPS = 3  # losses of the first stage recorded for the reproduction test (tests/test_base_models.py)
WEIGHTS = "model.safetensors"
FILES = ("config.json", WEIGHTS, "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Recipe:
    name: str  # models/<name>
    summary: str  # what it is pretrained on (the README's first paragraph)
    data_text: str  # the README's description of the data
    datasets: dict  # file name -> {"n", "seed", and "mix" (data.synthetic) or "prior" (data.lotka_volterra)}
    stages: list = field(default_factory=list)  # {"out", "model" ("init" or "<stage>/model"), "data", "args"}
    preset: str = "lv-tiny"
    init_seed: int = 0

    @property
    def model_dir(self) -> Path:
        return ROOT / "models" / self.name

    @property
    def default_work(self) -> str:
        return f"runs/{self.name}-pretrain"


SERIES_MIX = "kernelsynth=0.25,ar=0.05,sines=0.15,ode=0.15,lv=0.4"
SERIES_MIX_2 = "kernelsynth=0.15,ar=0.05,sines=0.1,ode=0.1,lv=0.15,predprey=0.45"
SERIES_TINY = Recipe(
    name="series-tiny",
    summary="broad synthetic series — Gaussian-process draws, AR processes, sums of sinusoids, other ODE "
            "systems, classic Lotka-Volterra and, in a second stage, predator-prey models of the users' family "
            "(logistic prey, saturating predator) over a broad prior — in LLMTIME text: a stand-in for a general "
            "pretrained model, which has seen many kinds of series, oscillating populations among them, but not "
            "the users' parameters",
    data_text=(
        "`data/synthetic.py`'s mixtures, stage 1 `" + SERIES_MIX + "`, stage 2 `" + SERIES_MIX_2 + "`: "
        "Gaussian-process draws from random kernel compositions (after Chronos' KernelSynth), AR(1-3) processes, "
        "sums of sinusoids with trends and envelopes, other ODE systems (oscillators, Van der Pol, "
        "FitzHugh-Nagumo, SIR/SIRS, Brusselator), classic Lotka-Volterra over a broad prior (near-equilibrium "
        "periods of 4-300 steps, log-uniform, of which the users' 15-32 is one sixth; levels 0.05-20x theirs) and "
        "(stage 2) `predprey`: logistic prey and a saturating predator with " + predprey_prior_text() + ", ranges "
        "that hold the users' calibrated ones (`data/lotka_volterra.py` `varied`) in a corner; every series "
        "non-negative, 100 steps over t = 0..200"),
    datasets={"synth.h5": {"n": 60000, "seed": 1, "mix": SERIES_MIX},
              "synth2.h5": {"n": 60000, "seed": 2, "mix": SERIES_MIX_2}},
    stages=[{"out": "run", "model": "init", "data": "synth.h5",
             "args": ["--steps", "5000", "--lr", "3e-3", "--warmup", "100"]},
            {"out": "run2", "model": "run/model", "data": "synth2.h5",
             "args": ["--steps", "6000", "--lr", "2e-3", "--warmup", "100"]}],
)
LV_TINY = Recipe(
    name="lv-tiny",
    summary="simulated Lotka-Volterra series from the prior calibrated on the users' file, in LLMTIME text",
    data_text=(
        "the `varied` prior of `data/lotka_volterra.py` (the default data set's simulator; the default set itself "
        "uses seed 0, so its test split is never trained on), 100 steps over t = 0..200"),
    datasets={"data.h5": {"n": 40000, "seed": 1, "prior": "varied"},
              "data2.h5": {"n": 30000, "seed": 2, "prior": "varied"},
              "data3.h5": {"n": 30000, "seed": 3, "prior": "varied"}},
    stages=[
        {"out": "run", "model": "init", "data": "data.h5",
         "args": ["--steps", "4000", "--lr", "3e-3", "--warmup", "100"]},
        {"out": "run2", "model": "run/model", "data": "data2.h5",
         "args": ["--steps", "3000", "--lr", "1e-3", "--warmup", "100"]},
        {"out": "run3", "model": "run2/model", "data": "data3.h5",
         "args": ["--steps", "3000", "--lr", "5e-4", "--warmup", "100"]},
    ],
)
RECIPES = {r.name: r for r in (SERIES_TINY, LV_TINY)}
MAX_THREADS = 1024  # --threads: beyond any machine's cores (torch would try to start that many threads)
DEFAULT = SERIES_TINY  # the demo's base
MODEL_DIR = DEFAULT.model_dir


def init_model(out: Path, recipe: Recipe = DEFAULT) -> Path:
    """Step 1: the preset with seeded random weights and the character tokenizer, in the HF layout."""
    from qwen_mini import Qwen, QwenConfig, char_tokenizer, save_pretrained

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.init_seed)
        model = Qwen(QwenConfig.from_name(recipe.preset))
    save_pretrained(model, out)
    char_tokenizer().save_pretrained(out)
    return out


def make_data(out: Path, recipe: Recipe = DEFAULT) -> Path:
    """Step 2: the data set the recipe names `out` after."""
    spec = recipe.datasets[out.name]
    if "mix" in spec:
        from data import synthetic

        return synthetic.save(out, synthetic.generate(spec["n"], spec["seed"], synthetic.parse_mix(spec["mix"])))
    from data.lotka_volterra import save, simulate

    return save(out, simulate(spec["n"], seed=spec["seed"], prior=spec["prior"]))


def data_command(work, name: str, spec: dict) -> str:
    if "mix" in spec:
        return f"python -m data.synthetic --n {spec['n']} --seed {spec['seed']} --mix {spec['mix']} --out {work}/{name}"
    return (f"python -m data.lotka_volterra --simulate --n {spec['n']} --seed {spec['seed']} --prior {spec['prior']} "
            f"--out {work}/{name}")


def train_argv(work: Path, stage: dict) -> list[str]:
    """A stage's train.py arguments."""
    return ["--model", str(work / stage["model"]), "--data", str(work / stage["data"]), *COMMON, *stage["args"],
            "--runs-dir", str(work), "--out", str(work / stage["out"])]


def commands(work: Path, recipe: Recipe = DEFAULT) -> list[str]:
    """The recipe as the commands it runs (step 1 is Python: no CLI makes a random model)."""
    which = "" if recipe is DEFAULT else f", RECIPES[\"{recipe.name}\"]"
    names = "init_model" if recipe is DEFAULT else "RECIPES, init_model"
    return [f"python -c 'from pathlib import Path; from models.recipe import {names}; "
            f"init_model(Path(\"{work}/init\"){which})'",
            *(data_command(work, name, spec) for name, spec in recipe.datasets.items()),
            *("python train.py " + " ".join(train_argv(work, stage)) for stage in recipe.stages)]


class StopAfter(Exception):
    """Raised by the hook of `first_losses` once the steps it wanted are done."""


def first_losses(work: Path, steps: int = FIRST_STEPS, recipe: Recipe = DEFAULT) -> list[float]:
    """Run the recipe's init, first data set and the first `steps` steps of its first stage in `work` (a fresh
    directory) and return their training losses: what tests/test_base_models.py compares with the recorded ones.
    Validation runs on one batch only (it does not touch the weights, the batches or any random state of training)."""
    from training.cli import build_parser, configs_from_args
    from training.loop import train_run

    stage = recipe.stages[0]
    work.mkdir(parents=True, exist_ok=True)
    init_model(work / stage["model"], recipe)
    make_data(work / stage["data"], recipe)
    args = build_parser().parse_args(train_argv(work, stage) + ["--val-batches", "1", "--eval-every", "100000"])
    config, = configs_from_args(args)
    losses = []

    def stop(step, entry):
        if step:
            losses.append(entry["train_loss"])
        if step >= steps:
            raise StopAfter

    try:
        train_run(config, hooks=[stop], progress=False)
    except StopAfter:
        pass
    return losses


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def export(work: Path, out: Path, wall: dict[str, float], threads: dict[str, int], recipe: Recipe = DEFAULT) -> Path:
    """Step 4: copy the last stage's weights and tokenizer into `out` and describe how they were made."""
    source = work / recipe.stages[-1]["out"] / "model"
    missing = [name for name in FILES if not (source / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{source}: missing {', '.join(missing)} (has the training finished?)")
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(source / name, out / name)
    stages = []
    for stage in recipe.stages:
        metrics = read_metrics(work / stage["out"])
        config = json.loads((work / stage["out"] / "config.json").read_text())
        steps = metrics[-1]["step"]
        stages.append({
            "out": stage["out"], "data": stage["data"], "args": COMMON + stage["args"], "steps": steps,
            "tokens_seen": steps * config["batch"] * config["ctx"], "train_windows": config.get("train_windows"),
            "per_step_flops": config["per_step_flops"], "train_flops": metrics[-1]["flops"],
            "wall_seconds": round(wall.get(stage["out"], float("nan")), 1), "threads": threads.get(stage["out"]),
            "val_losses": [(m["step"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None]})
    first = read_metrics(work / recipe.stages[0]["out"])
    record = {
        "name": recipe.name, "preset": recipe.preset, "init_seed": recipe.init_seed, "datasets": recipe.datasets,
        "stages": stages, "commands": commands(Path(recipe.default_work), recipe),
        "recipe_command": "python -m models.recipe" + ("" if recipe is DEFAULT else f" --model {recipe.name}"),
        "parameters": json.loads((work / recipe.stages[0]["out"] / "config.json").read_text()).get("total_params"),
        "weights_bytes": (out / WEIGHTS).stat().st_size, "train_flops": sum(s["train_flops"] for s in stages),
        "wall_seconds": round(sum(s["wall_seconds"] for s in stages), 1),
        "first_losses": [m["train_loss"] for m in first if 1 <= m["step"] <= FIRST_STEPS],
        "torch_version": torch.__version__, "sha256": sha256_file(out / WEIGHTS),
    }
    (out / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    write_readme(out, recipe)
    return out


def write_readme(out: Path, recipe: Recipe) -> Path:
    """The model's README.md from its recipe.json and config.json (`--readme-only` rewrites it after a wording
    change without retraining)."""
    record, config = (json.loads((out / name).read_text()) for name in ("recipe.json", "config.json"))
    (out / "README.md").write_text(readme(record, config, recipe))
    return out / "README.md"


def readme(r: dict, c: dict, recipe: Recipe) -> str:
    arch = (f"hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']} query heads and "
            f"{c['num_key_value_heads']} key/value head of dimension {c['head_dim']}, MLP {c['intermediate_size']}, "
            f"vocabulary {c['vocab_size']}, tied embeddings, RoPE theta {c['rope_theta']:g}, "
            f"max_position_embeddings {c['max_position_embeddings']}")
    first = ", ".join(f"{x:.6f}" for x in r["first_losses"])
    data = "; ".join(f"`{name}`: {d['n']:,} trajectories, seed {d['seed']}" for name, d in r["datasets"].items())
    stages = "\n".join(
        f"- Stage {i + 1} (`{s['out']}/`, on `{s['data']}`): `{' '.join(s['args'])}`; {s['steps']:,} steps "
        f"({s['tokens_seen']:,} token positions, {s['train_windows']:,} training windows), {s['train_flops']:.3g} "
        f"training FLOPs ({s['per_step_flops']:.3g} per step), {s['wall_seconds'] / 60:.0f} min on "
        f"{s['threads'] or '?'} torch thread(s); validation loss "
        f"{s['val_losses'][0][1]:.3f} at its start, {s['val_losses'][-1][1]:.3f} at its end (nats per token)."
        for i, s in enumerate(r["stages"]))
    path = f"models/{recipe.name}"
    return f"""# {recipe.name}

A small Qwen2-architecture model ({r['parameters']:,} parameters, {r['weights_bytes'] / 1e6:.1f} MB of float32
weights) pretrained from scratch on {recipe.summary}. Hugging Face layout
(`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`): it loads through the same
`from_pretrained` / `load_model_and_tokenizer` path as the real Qwen2.5, and every CLI takes it as `--model`:

    python forecast.py --model {path}                      # zero-shot forecasts of the default test split
    python train.py --model {path} --rank 8 --ctx 768 ...  # LoRA, as demo.py does

- Architecture: {arch} (the `{r['preset']}` preset in `qwen_mini/config.py`).
- Tokenizer: one token per character of LLMTIME text (`qwen_mini.tokenizer.char_tokenizer`: `0-9 . , ; -`,
  space, newline, and pad / eos / unk).
- Context: trained on whole 100-step series (about 1000 tokens each); a forecast prompt of 50 steps plus a
  50-step horizon is about 1000 tokens, well within max_position_embeddings.

## Recipe

One command, from the repository root: `{r['recipe_command']}` (`models/recipe.py`). It runs:

""" + "\n".join(f"    {cmd}" for cmd in r["commands"]) + f"""

then copies the last stage's `model/` here and writes this README and `recipe.json` (the same facts,
machine-readable).

- Data: {recipe.data_text}; {data}. The ordered split trains on the first 70 % of each (one 1024-token window per
  series) and validates on the next 15 %.
- Initial weights: torch seed {r['init_seed']}. Every weight is trained (`--full`), AdamW, bf16 autocast with
  float32 weights.
{stages}
- In all: {r['train_flops']:.3g} training FLOPs (counted by `qwen_mini.flops`), {r['wall_seconds'] / 60:.0f} min of
  training wall time on a 2-core CPU machine (torch {r['torch_version']}; other jobs ran beside it).
- First {len(r['first_losses'])} training losses of stage 1: {first} (tests/test_base_models.py reruns these steps and
  compares).
- sha256 of `model.safetensors`: `{r['sha256']}`
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.recipe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT.name, choices=sorted(RECIPES),
                   help="which base to make (default: %(default)s)")
    p.add_argument("--work", help="working directory: init/, the data sets, one directory per stage "
                                  "(default: runs/<model>-pretrain)")
    p.add_argument("--out", help="where the model is exported (default: models/<model>)")
    p.add_argument("--no-export", action="store_true", help="stop after training")
    p.add_argument("--readme-only", action="store_true",
                   help="only rewrite the exported model's README.md from its recipe.json")
    p.add_argument("--threads", type=bounded(int, 0, MAX_THREADS), default=0,
                   help="torch CPU threads (default: 0 = torch's own choice; 1 is faster on a busy shared machine)")
    args = p.parse_args(argv)
    recipe = RECIPES[args.model]
    work, out = Path(args.work or recipe.default_work), Path(args.out or recipe.model_dir)
    if args.readme_only:
        missing = [name for name in ("recipe.json", "config.json") if not (out / name).is_file()]
        if missing:
            p.error(f"--readme-only: {out} holds no exported model ({' and '.join(missing)} missing): give the --out "
                    "the recipe exported to, or run the recipe first")
    for flag, path in (("--work", work), ("--out", out)):
        if path.exists() and not path.is_dir():
            p.error(f"{flag} {path}: exists and is not a directory")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run_recipe(recipe, work, out, args)
    except OSError as e:  # a directory that cannot be written, a full disk: one line, the finished steps kept
        print(f"[recipe] error: {os_error_text(e)}; run the recipe again to continue", file=sys.stderr)
        return EXIT_FAILED


def run_recipe(recipe: Recipe, work: Path, out: Path, args) -> int:
    """The recipe's steps that are not done yet in `work`, then (unless --no-export) the export to `out`; with
    --readme-only, only the README of `out`."""
    import train

    if args.readme_only:
        print(write_readme(out, recipe))
        return 0
    cmds = commands(work, recipe)
    if not (work / "init" / WEIGHTS).is_file():
        print(f"[recipe] init: {cmds[0]}", flush=True)
        init_model(work / "init", recipe)
    for name, command in zip(recipe.datasets, cmds[1:]):
        if not (work / name).is_file():
            print(f"[recipe] data: {command}", flush=True)
            make_data(work / name, recipe)
    wall_file = work / "wall_seconds.json"  # each stage's wall time, summed over interrupted and resumed invocations
    wall = json.loads(wall_file.read_text()) if wall_file.is_file() else {}
    threads_file = work / "threads.json"  # each stage's torch threads, for the record
    threads = json.loads(threads_file.read_text()) if threads_file.is_file() else {}
    for stage, command in zip(recipe.stages, cmds[1 + len(recipe.datasets):]):
        run = work / stage["out"]
        if (run / "model" / WEIGHTS).is_file():
            continue
        resume = ["--resume"] if (run / "config.json").is_file() else []
        print(f"[recipe] train: {command}{' --resume' if resume else ''}", flush=True)
        began = time.perf_counter()
        code = train.main(train_argv(work, stage) + resume)
        wall[stage["out"]] = wall.get(stage["out"], 0.0) + time.perf_counter() - began
        wall_file.write_text(json.dumps(wall) + "\n")
        threads[stage["out"]] = torch.get_num_threads()
        threads_file.write_text(json.dumps(threads) + "\n")
        if code != 0:
            print(f"[recipe] training stopped (exit status {code}); run the recipe again to continue", file=sys.stderr)
            return code
    if args.no_export:
        return 0
    out = export(work, out, wall, threads, recipe)
    print(f"[recipe] export: {out}/ (sha256 of {WEIGHTS}: {json.loads((out / 'recipe.json').read_text())['sha256']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
