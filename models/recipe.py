"""The recipe of models/lv-tiny: a small Qwen2-architecture model pretrained from scratch on simulated
Lotka-Volterra series in LLMTIME text, with the project's own tools.

    python -m models.recipe                     # the whole recipe in runs/lv-tiny-pretrain, then models/lv-tiny
    python -m models.recipe --threads 1         # one torch thread (faster on a busy shared machine)

The steps (each printed as the command it equals; run again after an interruption, the recipe continues where it
stopped: finished steps are kept, training resumes from its last checkpoint):
  1. init    the "lv-tiny" preset of qwen_mini/config.py with random weights (torch seed INIT_SEED) and the
             character tokenizer -> WORK/init: config.json, model.safetensors, tokenizer.json, tokenizer_config.json
  2. data    python -m data.lotka_volterra --simulate --n N --seed S --prior varied --out WORK/FILE, for each data
             set of DATASETS (the default data set's simulator and prior, other seeds: its test split is never seen)
  3. train   python train.py --model MODEL --data WORK/FILE --full ... --runs-dir WORK --out WORK/RUN, for each stage
             of STAGES: the first from the random init, the second continuing from the first's weights on fresh data
             with the learning rate warmed up again (a longer schedule in two runs)
  4. export  the last stage's model -> models/lv-tiny, plus README.md and recipe.json: the commands and settings,
             steps, tokens, FLOPs, wall time, the first steps' losses and the sha256 of model.safetensors
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from common.fileio import sha256_file

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "lv-tiny"
PRESET = "lv-tiny"
INIT_SEED = 0
# Trajectories of the default length (100 steps over 0..200) from the default prior.
DATASETS = {"data.h5": {"n": 40000, "seed": 1, "prior": "varied"},
            "data2.h5": {"n": 30000, "seed": 2, "prior": "varied"},
            "data3.h5": {"n": 30000, "seed": 3, "prior": "varied"}}
COMMON = ["--full", "--ctx", "1024", "--batch", "8", "--schedule", "cosine", "--dtype", "bfloat16", "--seed", "0",
          "--eval-every", "100", "--val-batches", "4", "--checkpoint-every", "100"]
STAGES = [
    {"out": "run", "model": "init", "data": "data.h5", "args": ["--steps", "4000", "--lr", "3e-3", "--warmup", "100"]},
    {"out": "run2", "model": "run/model", "data": "data2.h5",
     "args": ["--steps", "3000", "--lr", "1e-3", "--warmup", "100"]},
    {"out": "run3", "model": "run2/model", "data": "data3.h5",
     "args": ["--steps", "3000", "--lr", "5e-4", "--warmup", "100"]},
]
FIRST_STEPS = 3  # losses of the first stage recorded for the reproduction test (tests/test_lv_tiny.py)
WEIGHTS = "model.safetensors"
FILES = ("config.json", WEIGHTS, "tokenizer.json", "tokenizer_config.json")


def init_model(out: Path) -> Path:
    """Step 1: the preset with seeded random weights and the character tokenizer, in the HF layout."""
    from qwen_mini import Qwen, QwenConfig, char_tokenizer, save_pretrained

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        model = Qwen(QwenConfig.from_name(PRESET))
    save_pretrained(model, out)
    char_tokenizer().save_pretrained(out)
    return out


def simulate_data(out: Path) -> Path:
    """Step 2: the data set DATASETS names `out` after."""
    from data.lotka_volterra import save, simulate

    spec = DATASETS[out.name]
    return save(out, simulate(spec["n"], seed=spec["seed"], prior=spec["prior"]))


def train_argv(work: Path, stage: dict) -> list[str]:
    """A stage's train.py arguments."""
    return ["--model", str(work / stage["model"]), "--data", str(work / stage["data"]), *COMMON, *stage["args"],
            "--runs-dir", str(work), "--out", str(work / stage["out"])]


def commands(work: Path) -> list[str]:
    """The recipe as the commands it runs (step 1 is Python: no CLI makes a random model)."""
    return [f"python -c 'from pathlib import Path; from models.recipe import init_model; "
            f"init_model(Path(\"{work}/init\"))'",
            *(f"python -m data.lotka_volterra --simulate --n {d['n']} --seed {d['seed']} --prior {d['prior']} "
              f"--out {work}/{name}" for name, d in DATASETS.items()),
            *("python train.py " + " ".join(train_argv(work, stage)) for stage in STAGES)]


class StopAfter(Exception):
    """Raised by the hook of `first_losses` once the steps it wanted are done."""


def first_losses(work: Path, steps: int = FIRST_STEPS) -> list[float]:
    """Run the recipe's init, first data set and the first `steps` steps of its first stage in `work` (a fresh
    directory) and return their training losses: what tests/test_lv_tiny.py compares with the recorded ones.
    Validation runs on one batch only (it does not touch the weights, the batches or any random state of training)."""
    from training.cli import build_parser, configs_from_args
    from training.loop import train_run

    stage = STAGES[0]
    work.mkdir(parents=True, exist_ok=True)
    init_model(work / stage["model"])
    simulate_data(work / stage["data"])
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


def export(work: Path, out: Path, wall: dict[str, float], threads: dict[str, int]) -> Path:
    """Step 4: copy the last stage's weights and tokenizer into `out` and describe how they were made."""
    source = work / STAGES[-1]["out"] / "model"
    missing = [name for name in FILES if not (source / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{source}: missing {', '.join(missing)} (has the training finished?)")
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(source / name, out / name)
    stages = []
    for stage in STAGES:
        metrics, config = read_metrics(work / stage["out"]), json.loads((work / stage["out"] / "config.json").read_text())
        steps = metrics[-1]["step"]
        stages.append({
            "out": stage["out"], "data": stage["data"], "args": COMMON + stage["args"], "steps": steps,
            "tokens_seen": steps * config["batch"] * config["ctx"], "train_windows": config.get("train_windows"),
            "per_step_flops": config["per_step_flops"], "train_flops": metrics[-1]["flops"],
            "wall_seconds": round(wall.get(stage["out"], float("nan")), 1), "threads": threads.get(stage["out"]),
            "val_losses": [(m["step"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None]})
    first = read_metrics(work / STAGES[0]["out"])
    record = {
        "preset": PRESET, "init_seed": INIT_SEED, "datasets": DATASETS, "stages": stages,
        "commands": commands(Path("runs/lv-tiny-pretrain")),
        "recipe_command": "python -m models.recipe",
        "parameters": json.loads((work / STAGES[0]["out"] / "config.json").read_text()).get("total_params"),
        "weights_bytes": (out / WEIGHTS).stat().st_size, "train_flops": sum(s["train_flops"] for s in stages),
        "wall_seconds": round(sum(s["wall_seconds"] for s in stages), 1),
        "first_losses": [m["train_loss"] for m in first if 1 <= m["step"] <= FIRST_STEPS],
        "torch_version": torch.__version__, "sha256": sha256_file(out / WEIGHTS),
    }
    (out / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "README.md").write_text(readme(record, json.loads((out / "config.json").read_text())))
    return out


def readme(r: dict, c: dict) -> str:
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
    return f"""# lv-tiny

A small Qwen2-architecture model ({r['parameters']:,} parameters, {r['weights_bytes'] / 1e6:.1f} MB of float32
weights) pretrained from scratch on simulated Lotka-Volterra series in LLMTIME text. Hugging Face layout
(`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`): it loads through the same
`from_pretrained` / `load_model_and_tokenizer` path as the real Qwen2.5, and every CLI takes it as `--model`:

    python forecast.py --model models/lv-tiny                     # zero-shot forecasts of the default test split
    python train.py --model models/lv-tiny --rank 8 --ctx 768 ... # LoRA, as demo.py does

- Architecture: {arch} (the `{r['preset']}` preset in `qwen_mini/config.py`).
- Tokenizer: one token per character of LLMTIME text (`qwen_mini.tokenizer.char_tokenizer`: `0-9 . , ; -`,
  space, newline, and pad / eos / unk).
- Context: trained on whole 100-step trajectories (about 1000 tokens each); a forecast prompt of 50 steps plus a
  50-step horizon is about 1000 tokens, well within max_position_embeddings.

## Recipe

One command, from the repository root: `{r['recipe_command']}` (`models/recipe.py`). It runs:

""" + "\n".join(f"    {cmd}" for cmd in r["commands"]) + f"""

then copies the last stage's `model/` here and writes this README and `recipe.json` (the same facts,
machine-readable).

- Data: the `varied` prior of `data/lotka_volterra.py` (the default data set's simulator; the default set itself
  uses seed 0, so its test split is never trained on), 100 steps over t = 0..200; {data}. The ordered split trains
  on the first 70 % of each (one 1024-token window per trajectory) and validates on the next 15 %.
- Initial weights: torch seed {r['init_seed']}. Every weight is trained (`--full`), AdamW, bf16 autocast with
  float32 weights.
{stages}
- In all: {r['train_flops']:.3g} training FLOPs (counted by `qwen_mini.flops`), {r['wall_seconds'] / 60:.0f} min of
  training wall time on a 2-core CPU machine (other jobs ran beside the one-thread stages; torch
  {r['torch_version']}).
- First {len(r['first_losses'])} training losses of stage 1: {first} (tests/test_lv_tiny.py reruns these steps and
  compares).
- sha256 of `model.safetensors`: `{r['sha256']}`
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.recipe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/lv-tiny-pretrain",
                   help="working directory: init/, the data sets, one directory per stage (default: %(default)s)")
    p.add_argument("--out", default=str(MODEL_DIR), help="where the model is exported (default: models/lv-tiny)")
    p.add_argument("--no-export", action="store_true", help="stop after training")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: 0 = torch's own choice; 1 is faster on a busy shared machine)")
    args = p.parse_args(argv)
    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    import train

    work = Path(args.work)
    cmds = commands(work)
    if not (work / "init" / WEIGHTS).is_file():
        print(f"[recipe] init: {cmds[0]}", flush=True)
        init_model(work / "init")
    for name, command in zip(DATASETS, cmds[1:]):
        if not (work / name).is_file():
            print(f"[recipe] data: {command}", flush=True)
            simulate_data(work / name)
    wall_file = work / "wall_seconds.json"  # each stage's wall time, summed over interrupted and resumed invocations
    wall = json.loads(wall_file.read_text()) if wall_file.is_file() else {}
    threads_file = work / "threads.json"  # each stage's torch threads, for the record
    threads = json.loads(threads_file.read_text()) if threads_file.is_file() else {}
    for stage, command in zip(STAGES, cmds[1 + len(DATASETS):]):
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
    out = export(work, Path(args.out), wall, threads)
    print(f"[recipe] export: {out}/ (sha256 of {WEIGHTS}: {json.loads((out / 'recipe.json').read_text())['sha256']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
