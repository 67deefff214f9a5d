"""The parts of bench/gpu_check.py, each the body of one subprocess (`gpu_check.py --part NAME OUT`): the machine's
limits, `pytest -m gpu`, LoRA training steps, forecasting and batch-1 decoding, and a plan's runs as jobs on the GPU.
Each writes OUT/<part>.json after every case, so a part stopped at its timeout keeps what it measured; a case that
fails is recorded with its error and the part goes on to the next (and exits 1 at the end).

The training and forecasting cases are bench.py's own (`bench.bench.run_case` on `bench.bench.parse_args` flags),
in this one process, one after another, the GPU's peak memory reset before each."""
from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.fileio import write_json_atomic

TRAIN_DTYPES = ("bfloat16", "float16", "float32")
QWEN_VOCAB = 151665  # the Qwen2.5 tokenizer's ids, added tokens included
PEAK_DTYPES = TRAIN_DTYPES  # fp16 autocast runs its products on the fp16 peak, bf16 on the bf16 one
# Third-party modules: the product's (torch ... tqdm), the product's optional ones (hub downloads, --tensorboard,
# --launcher slurm), and the references and tools the check itself uses.
PACKAGES = {"torch": "product", "numpy": "product", "safetensors": "product", "tokenizers": "product",
            "h5py": "product", "matplotlib": "product", "tqdm": "product", "huggingface_hub": "product, hub only",
            "tensorboard": "product, --tensorboard only", "submitit": "product, --launcher slurm only",
            "transformers": "reference (HF cases)", "peft": "reference (HF cases)", "pytest": "pytest_gpu part"}


@dataclass(frozen=True)
class Mode:
    """The sizes of one kind of check: the real ones on a GPU, tiny ones for the CPU smoke run."""
    name: str
    device: str
    config: str  # bench.py --config of the training and forecasting cases
    threads: int | None  # torch threads (None: bench.py's default, every core)
    gemm_size: int  # the square product whose rate is the GEMM peak
    train_batch: int
    train_ctxs: tuple[int, ...]  # the first is the goal's (ctx 768 on the GPU)
    train_reps: int
    forecast_dtype: str
    fc_trajectories: int
    fc_samples: int
    fc_steps: int  # context and horizon, LLMTIME steps each
    decode_prompt_len: int
    decode_new: int
    decode_reps: int
    plan_steps: int  # each run of the jobs part's tiny plan
    wall_s: float  # the whole check
    timeouts: dict = field(default_factory=dict)  # part -> its own limit in seconds
    reserves: dict = field(default_factory=dict)  # part -> the least time worth starting it with


GPU = Mode(name="gpu", device="cuda", config="qwen2.5-0.5b", threads=None, gemm_size=8192, train_batch=4,
           train_ctxs=(768, 512), train_reps=10, forecast_dtype="bfloat16", fc_trajectories=50, fc_samples=10,
           fc_steps=50, decode_prompt_len=500, decode_new=256, decode_reps=3, plan_steps=6, wall_s=480,
           timeouts={"machine": 60, "pytest_gpu": 150, "train": 180, "forecast": 240, "jobs": 90},
           reserves={"machine": 20, "pytest_gpu": 60, "train": 60, "forecast": 90, "jobs": 45})
# One thread: on a CPU shared with other work, two threads of tiny GEMMs wait on each other (5 ms per tiny linear).
SMOKE = Mode(name="cpu-smoke", device="cpu", config="tiny-1layer", threads=1, gemm_size=256, train_batch=2,
             train_ctxs=(48, 32), train_reps=1, forecast_dtype="float32", fc_trajectories=2, fc_samples=2, fc_steps=4,
             decode_prompt_len=16, decode_new=8, decode_reps=1, plan_steps=2, wall_s=420,
             timeouts={"machine": 60, "pytest_gpu": 120, "train": 120, "forecast": 120, "jobs": 120},
             reserves={"machine": 10, "pytest_gpu": 20, "train": 20, "forecast": 20, "jobs": 20})
MODES = {mode.name: mode for mode in (GPU, SMOKE)}


class PartRecord:
    """OUT/<part>.json of a running part: its cases, saved after each one (and before, as "running")."""

    def __init__(self, path: Path, part: str, mode: Mode):
        self.path, self.failures = path, 0
        self.data = {"part": part, "mode": mode.name, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cases": []}

    def save(self) -> None:
        write_json_atomic(self.path, self.data)

    @contextlib.contextmanager
    def case(self, **fields):
        """One case: its fields, then what the body adds to the yielded dict; an exception inside is recorded
        (status "failed", the error's line and the traceback's tail) and not raised. A body may set "skipped"."""
        case = {**fields, "status": "running"}
        self.data["cases"].append(case)
        self.save()
        label = ", ".join(f"{k} {v}" for k, v in fields.items())
        print(f"[gpu_check] {self.data['part']}: {label} ...", flush=True)
        start = time.perf_counter()
        try:
            yield case
            if case["status"] == "running":
                case["status"] = "ok"
        except (Exception, SystemExit) as e:  # bench.py reports a bad case by SystemExit
            case.update(status="failed", error=f"{type(e).__name__}: {e}".splitlines()[0][:400],
                        traceback=traceback.format_exc()[-2000:])
            self.failures += 1
            traceback.print_exc()
        finally:
            case["wall_s"] = round(time.perf_counter() - start, 2)
            self.save()
            print(f"[gpu_check] {self.data['part']}: {label}: {case['status']} ({case['wall_s']:.1f} s)", flush=True)


# ---- machine ---------------------------------------------------------------------------------------------------------

def part_machine(mode: Mode, record: PartRecord, out: Path) -> None:
    """The GPU (or CPU), the library versions, and for each dtype the GEMM peak (the best of a large square product
    and bench's MLP-shape products) and the copy bandwidth: the denominators of the other parts' MFU and bounds."""
    import torch

    from bench.bench import build_config
    from bench.measure import task_machine

    device = torch.device(mode.device)
    if mode.threads:
        torch.set_num_threads(mode.threads)
    info = record.data
    info.update(python=sys.version.split()[0], torch=torch.__version__, cuda=torch.version.cuda,
                platform=platform.platform(), cpu_count=os.cpu_count(), packages=package_versions(),
                float32_matmul_precision=torch.get_float32_matmul_precision())  # "highest": fp32 is not TF32
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "multiprocessors": props.multi_processor_count,
                       "memory_gib": round(props.total_memory / 2**30, 1)}
        info["nvidia_smi"] = nvidia_smi()
    else:
        info["gpu"] = None
    config = build_config(mode.config)
    for dtype in PEAK_DTYPES:
        with record.case(dtype=dtype) as case:
            square = square_gemm_gflops(device, getattr(torch, dtype), mode.gemm_size)
            limits = task_machine(None, "ours", config, SimpleNamespace(dtype=dtype), device)
            case.update(square_gflops=square, square_size=mode.gemm_size, mlp_gflops=limits["gemm_gflops"],
                        peak_gflops=max(square, limits["gemm_peak_gflops"]), bandwidth_gbs=limits["bandwidth_gbs"])


def square_gemm_gflops(device, dtype, n: int, products: int = 10) -> float:
    """The best rate of `products` n x n x n matrix products in a row (random data: zeros run faster), best of 5."""
    import torch

    from bench.measure import timed

    gen = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen, device=device).to(dtype) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    best = min(timed(lambda: [torch.mm(a, b, out=c) for _ in range(products)], device, reps=5, warmup=2))
    return 2 * n ** 3 * products / best / 1e9


def package_versions() -> dict:
    """module -> {"version" (None: not installed), "used by"}."""
    found = {}
    for module, role in PACKAGES.items():
        version = None
        if importlib.util.find_spec(module) is not None:
            try:
                version = importlib.metadata.version(module.replace("_", "-"))
            except importlib.metadata.PackageNotFoundError:
                version = "installed (version unknown)"
        found[module] = {"version": version, "used by": role}
    return found


def nvidia_smi() -> str | None:
    """The card's state as found (clocks, power, temperature): read, never set."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = "name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,memory.used"
    proc = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True,
                          timeout=30)
    return (proc.stdout or proc.stderr).strip()


# ---- pytest -m gpu ---------------------------------------------------------------------------------------------------

def part_pytest_gpu(mode: Mode, record: PartRecord, out: Path) -> None:
    """`pytest -m gpu` (on a CPU every one of them skips: "needs CUDA"), each test's outcome read from its JUnit
    report; failed tests fail the part."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
                   f"--junitxml={junit}", "-o", "junit_logging=system-out"]
        record.data["command"] = "python -m pytest -m gpu -q -rfEs"
        exit_code = subprocess.run(command, cwd=ROOT).returncode
        record.data["pytest_exit_code"] = exit_code
        tests = junit_tests(junit) if junit.is_file() else []
    for test in tests:
        record.data["cases"].append(test)
    record.data["counts"] = {outcome: sum(t["status"] == outcome for t in tests)
                             for outcome in ("passed", "failed", "error", "skipped")}
    record.save()
    if exit_code != 0:
        raise SystemExit(f"pytest -m gpu exited with status {exit_code}")


def junit_tests(path: Path) -> list[dict]:
    """Each test case of a JUnit XML report: its name, outcome, seconds, message and the end of what it printed."""
    tests = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or child.text or "")[:400]
        printed = "".join(child.text or "" for child in case if child.tag == "system-out")
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "status": outcome,
                      "seconds": float(case.get("time") or 0), "message": message, "printed": printed[-400:]})
    return tests


# ---- training and forecasting: bench.py's cases ---------------------------------------------------------------------

def bench_case(mode: Mode, task: str, impl: str, dtype: str, flags: list[str], compile: bool = False) -> dict:
    """bench.py's run_case for one (task, impl) in this process, then the memory it held given back."""
    import torch

    from bench.bench import parse_args, run_case

    argv = ["--config", mode.config, "--device", mode.device, "--dtype", dtype, "--task", task, "--impl", impl,
            *flags, *(["--threads", str(mode.threads)] if mode.threads else []), *(["--compile"] if compile else [])]
    args, _ = parse_args(argv)
    try:
        return run_case(args)
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def references_missing() -> list[str]:
    """The HF reference libraries this machine lacks (the HF cases are skipped without them)."""
    return [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]


def compile_backend(mode: Mode) -> str:
    """What torch.compile does in this process. The CPU smoke run keeps dynamo's tracing (whole graphs, guards,
    recompilations: what the GPU run meets) but runs the traced graphs as they are, without inductor's C++ code
    generation, which takes over a minute per graph on two cores."""
    if mode.device != "cpu":
        return "inductor"
    import torch._inductor.compile_fx as compile_fx

    compile_fx.compile_fx = lambda graph_module, example_inputs, **kwargs: graph_module.forward
    return "dynamo trace, run eagerly (CPU smoke)"


def machine_peaks(out: Path) -> dict:
    """dtype -> GEMM peak GFLOP/s from this run's OUT/machine.json ({} when that part has not measured them)."""
    import json

    path = out / "machine.json"
    if not path.is_file():
        return {}
    cases = json.loads(path.read_text()).get("cases", [])
    return {c["dtype"]: c["peak_gflops"] for c in cases if c.get("status") == "ok"}


def train_cases(mode: Mode) -> list[tuple[int, str, str, bool]]:
    """(ctx, dtype, impl, compiled): every dtype, ours then HF, at each ctx (the goal's first); then our compiled
    bf16 step at the goal's ctx (last: its compilation is the slowest case)."""
    cases = [(ctx, dtype, impl, False) for ctx in mode.train_ctxs for dtype in TRAIN_DTYPES for impl in ("ours", "hf")]
    return cases + [(mode.train_ctxs[0], "bfloat16", "ours", True)]


def part_train(mode: Mode, record: PartRecord, out: Path) -> None:
    """LoRA steps (r8 on q,v, AdamW, batch x ctx of random tokens, random weights of the config's shapes) as train.py
    trains: bf16 base under bf16 autocast, fp16 autocast over float32 weights with GradScaler, plain float32; ours
    and HF + PEFT on the same weights. MFU = the FLOPs the step executes (bench.tasks.executed_step_flops: forward,
    input gradients, adapters' weight gradients) per second over the dtype's GEMM peak of machine.json."""
    peaks, missing = machine_peaks(out), references_missing()
    record.data.update(peaks_gflops=peaks, batch=mode.train_batch, rank=8, targets="q_proj,v_proj",
                       compile_backend=compile_backend(mode), references_missing=missing)
    for ctx, dtype, impl, compiled in train_cases(mode):
        with record.case(ctx=ctx, dtype=dtype, impl=impl, compile=compiled) as case:
            if impl == "hf" and missing:
                case.update(status="skipped", reason=f"not importable here: {', '.join(missing)}")
                continue
            flags = ["--batch", str(mode.train_batch), "--ctx", str(ctx), "--reps", str(mode.train_reps)]
            result = bench_case(mode, "train_step", impl, dtype, flags, compiled)
            step_s = result["median_s"]
            case.update(step_s=step_s, seconds=result["seconds"], tokens=result["tokens"],
                        tokens_per_s=result["tokens"] / step_s, flops=result["flops"],
                        tflops_per_s=result["flops"] / step_s / 1e12, peak_gib=result["peak_bytes"] / 2**30,
                        task_gib=result["task_peak_bytes"] / 2**30, peak_kind=result["peak_kind"],
                        mfu=result["flops"] / step_s / (peaks[dtype] * 1e9) if dtype in peaks else None)


def forecast_cases() -> list[tuple[str, str, bool]]:
    """(workload, impl, compiled), the goals' cases first: if the part is cut short, the rest is what goes."""
    return [("forecast", "ours", False), ("forecast", "hf", False), ("decode1", "ours", True),
            ("decode1", "ours", False), ("forecast", "ours", True), ("decode1", "hf", False)]


def forecast_tokenizer(mode: Mode) -> str:
    """The real Qwen2.5 tokenizer where this checkout has the shared fixture (and the config Qwen's vocabulary), else
    the product's own character tokenizer (models/lv-tiny): LLMTIME text is one token per character in both (Qwen2.5
    splits digits), so the prompts, forecasts and every step's work are the same size. Nothing is downloaded."""
    from bench.bench import SHARED_TOKENIZER, build_config

    if build_config(mode.config).vocab_size >= QWEN_VOCAB and SHARED_TOKENIZER.is_dir():
        return str(SHARED_TOKENIZER)
    return str(ROOT / "models" / "lv-tiny")


def part_forecast(mode: Mode, record: PartRecord, out: Path) -> None:
    """The forecaster's workload at the config's size (bench.py --tasks forecast: trajectories x samples under the
    number grammar, sampled; ours with its default decoding, eager and --compile; HF generate with
    num_return_sequences and the same grammar as a logits processor), and batch-1 greedy decoding (one prompt,
    bench.py --tasks generate --gen-prompts 1): tokens/s, each implementation counting its own tokens."""
    tokenizer, missing = forecast_tokenizer(mode), references_missing()
    steps = str(mode.fc_steps)
    record.data.update(dtype=mode.forecast_dtype, tokenizer=os.path.relpath(tokenizer, ROOT),
                       trajectories=mode.fc_trajectories, samples=mode.fc_samples, context_steps=mode.fc_steps,
                       horizon_steps=mode.fc_steps, decode_prompt_len=mode.decode_prompt_len,
                       decode_new=mode.decode_new, compile_backend=compile_backend(mode), references_missing=missing)
    flags = {"forecast": ["--fc-trajectories", str(mode.fc_trajectories), "--fc-samples", str(mode.fc_samples),
                          "--fc-context", steps, "--fc-horizon", steps, "--gen-reps", "1", "--tokenizer", tokenizer],
             "decode1": ["--gen-prompts", "1", "--gen-prompt-len", str(mode.decode_prompt_len), "--gen-new",
                         str(mode.decode_new), "--gen-reps", str(mode.decode_reps)]}
    for workload, impl, compiled in forecast_cases():
        with record.case(workload=workload, impl=impl, compile=compiled) as case:
            if impl == "hf" and missing:
                case.update(status="skipped", reason=f"not importable here: {', '.join(missing)}")
                continue
            task = "forecast" if workload == "forecast" else "generate"
            result = bench_case(mode, task, impl, mode.forecast_dtype, flags[workload], compiled)
            case.update({key: result[key] for key in ("rows", "complete_rows", "decode_forwards", "prompt_tokens")
                         if key in result})
            case.update(seconds=result["median_s"], tokens=result["tokens"],
                        tokens_per_s=result["tokens"] / result["median_s"], flops=result["flops"],
                        peak_gib=result["peak_bytes"] / 2**30)


# ---- a plan's runs as jobs on the GPU ------------------------------------------------------------------------------

PLAN = """[study]
name = "gpucheck"
gqa = "mha"

[train]
model = "tiny"
batch = 2
ctx = 32
steps = {steps}
val_batches = 1
eval_every = {steps}
checkpoint_every = {steps}
rank = 2

[[stage]]
name = "grid"
lr = [1e-3, 3e-3]
"""


def part_jobs(mode: Mode, record: PartRecord, out: Path) -> None:
    """train.py --plan on a tiny two-run plan: --jobs 2 --gpus 0,0 (two jobs on one GPU) is refused before anything
    runs; --jobs 1 --gpus 0 trains both runs in jobs that see GPU 0 alone (CUDA_VISIBLE_DEVICES=0) as cuda:0. On a
    CPU --gpus 0 is refused instead (no CUDA device), and --jobs 2 runs the jobs on the CPU."""
    with tempfile.TemporaryDirectory() as tmp:
        plan = Path(tmp) / "gpucheck.toml"
        plan.write_text(PLAN.format(steps=mode.plan_steps))
        record.data["plan"] = plan.read_text()

        def check(name: str, flags: list[str], expect_exit: int, expect_text: str = ""):
            runs = Path(tmp) / name.replace(" ", "_")
            with record.case(check=name, command="train.py --plan PLAN " + " ".join(flags)) as case:
                exit_code, output = run_train(["--plan", str(plan), "--runs-dir", str(runs), *flags])
                case.update(exit_code=exit_code, output_tail=output[-1500:], expect=f"exit {expect_exit}" + (
                    f", {expect_text!r}" if expect_text else ""))
                if exit_code != expect_exit or expect_text not in output:
                    raise AssertionError(f"expected exit {expect_exit} and {expect_text!r}, got exit {exit_code}")
                if expect_exit == 0:
                    case["runs"] = trained_runs(runs / "gpucheck" / "grid", mode, "--gpus" in flags)
                elif any(runs.rglob("flops.json")):
                    raise AssertionError("a refused command left a run behind")

        check("two jobs on one GPU refused", ["--jobs", "2", "--gpus", "0,0"], 2, "distinct GPU numbers")
        if mode.device == "cuda":
            check("one job on GPU 0", ["--jobs", "1", "--gpus", "0"], 0)
        else:
            check("--gpus refused without CUDA", ["--jobs", "1", "--gpus", "0"], 2, "no CUDA device is available")
            check("two jobs on the CPU", ["--jobs", "2"], 0)


def run_train(argv: list[str]) -> tuple[int, str]:
    """python train.py ARGV: (exit status, its output). It runs in the part's process group, so the part's timeout
    stops it with SIGTERM, which train.py passes on to its jobs (each stops after its step)."""
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    print(proc.stdout, flush=True)
    return proc.returncode, proc.stdout


def trained_runs(stage_dir: Path, mode: Mode, on_gpu: bool) -> list[dict]:
    """Each run of the stage: where it trained (its config.json's device_used), its last step, and whether its job's
    log names the GPU it was given; raises AssertionError where a run is unfinished or trained elsewhere."""
    import json

    runs = []
    for config_path in sorted(stage_dir.glob("*/config.json")):
        config = json.loads(config_path.read_text())
        metrics = [json.loads(line) for line in (config_path.parent / "metrics.jsonl").read_text().splitlines()]
        log = stage_dir.parent / "jobs" / "grid" / f"{config_path.parent.name}.log"
        runs.append({"run": config_path.parent.name, "device_used": config["device_used"],
                     "last_step": metrics[-1]["step"], "log_names_gpu": "(CUDA_VISIBLE_DEVICES=0)" in log.read_text()})
    want = "cuda:0" if on_gpu else "cpu"
    if len(runs) != 2 or any(r["last_step"] != mode.plan_steps or r["device_used"] != want
                             or r["log_names_gpu"] != on_gpu for r in runs):
        raise AssertionError(f"expected 2 runs of {mode.plan_steps} steps on {want}, got {runs}")
    return runs


PARTS = {"machine": part_machine, "pytest_gpu": part_pytest_gpu, "train": part_train, "forecast": part_forecast,
         "jobs": part_jobs}
