"""One training run's settings (`TrainConfig`), their checks, and the names runs get from them."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from common.args import MAX_SEED
from common.devices import DTYPES
from common.fields import SettingsError, check_field_types
from data.dataset import DEFAULT_CONTEXT
from data.llmtime import DEFAULT_SCALER, ScalerNameError, scaling_rule
from data.lotka_volterra import SPLIT_MODES
from lora import check_targets
from qwen_mini.flops import GQA_MODES

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
SCHEDULES = ("constant", "cosine", "wsd")
DEFAULT_DECAY = 0.2  # wsd: the share of the steps over which the learning rate decays to 0 (Hägele et al. 2024)
# The most steps a run may take: a billion steps write a metrics.jsonl of some 250 GB and take years even for the tiny
# model on a CPU; a larger number is a typo (and would only make the FLOP count's arithmetic huge).
MAX_STEPS = 10 ** 9
# The largest learning rate a run may take: AdamW moves every weight by about lr each step, so a larger one is a typo;
# from about 3e37 its step (lr / (1 - beta1)) does not even fit a float32 and the first step fails with a traceback,
# after FLOPs were booked.
MAX_LR = 1e6
# Steps of each trajectory the LLMTIME scaler is fitted on: data.dataset's evaluation context, so training text and
# forecast prompts are scaled by the same rule.
FIT_STEPS = DEFAULT_CONTEXT

# Settings that change what a run computes: a resumed run must have the same values as the run it continues.
# (--steps may grow; --eval-every, --checkpoint-every, --val-batches, --device and the output paths may change.)
TRAJECTORY_KEYS = ("model", "data", "full", "rank", "alpha", "targets", "lora_dropout", "lr", "batch", "ctx", "stride",
                   "decimals", "scaler", "seed", "split_mode", "split_seed", "warmup", "schedule", "decay", "grad_clip",
                   "weight_decay", "dtype")
# The trajectory keys in which a run may differ from the run it continues (--continue-from): the schedule after the
# stable phase they share (training.setup.lr_factor).
CONTINUE_KEYS = ("schedule", "decay")


class ConfigError(SettingsError):
    """Settings that cannot make a training run."""


@dataclass
class TrainConfig:
    model: str = DEFAULT_MODEL
    data: str | None = None  # h5 path; None = the built-in simulated set
    full: bool = False  # train every weight instead of LoRA adapters
    rank: int = 4
    alpha: float | None = None  # None = rank
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_dropout: float = 0.0
    lr: float = 1e-5
    batch: int = 4  # windows per optimizer step, over all processes
    ctx: int = 512
    stride: int | None = None  # None = ctx // 2
    steps: int = 1000
    eval_every: int | None = None  # None = steps // 10 (at least 1)
    val_batches: int = 8
    checkpoint_every: int = 100  # 0 = only at the end
    decimals: int = 2
    scaler: str = DEFAULT_SCALER  # the LLMTIME scaling rule (data.llmtime.scaling_rule), fitted on FIT_STEPS steps
    seed: int = 0
    split_mode: str = "ordered"  # "ordered": the last 15 % of the trajectories are the test split; or "random"
    split_seed: int = 0  # the random split's seed
    warmup: int = 0
    schedule: str = "constant"
    decay: float | None = None  # wsd: the share of the steps that decays the lr to 0; None = DEFAULT_DECAY under wsd
    grad_clip: float = 1.0  # 0 = no clipping
    weight_decay: float = 0.0
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder block (same math; compiled once per process)
    device: str = "auto"
    dtype: str = "auto"
    max_flops: int | None = None  # None: the runs directory's recorded cap (ledger.cap), else 1e17
    change_max_flops: bool = False  # make max_flops the runs directory's cap though another is recorded
    gqa: str | None = None  # counting convention of the ledger: real, mha; None = the runs directory's (else real)
    no_budget: bool = False  # train without a reservation (allowed outside runs_dir; then counted nowhere)
    runs_dir: str = "runs"
    out: str | None = None  # the run directory; None = runs_dir / run_name
    resume: bool = False
    continue_from: str | None = None  # a run directory whose checkpoint this run starts from (training.rundir)
    tensorboard: bool = False  # also write TensorBoard event files (training.tensorboard)
    tensorboard_dir: str | None = None  # where they go; None = <run dir>/tensorboard

    def __post_init__(self):
        check_field_types(self, ConfigError)  # first: the defaults below compute with the values
        self.targets = tuple(self.targets)
        if self.alpha is None:
            self.alpha = float(self.rank)
        if self.stride is None:
            self.stride = self.ctx // 2
        if self.eval_every is None:
            self.eval_every = max(self.steps // 10, 1)
        if self.decay is None and self.schedule == "wsd":
            self.decay = DEFAULT_DECAY
        self.validate()

    def validate(self) -> None:
        def positive(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}", key=name)

        def non_negative(name, kind=int):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, kind)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value!r}", key=name)

        positive("ctx")
        if self.ctx < 2:  # checked first: the default stride (ctx // 2) follows from it
            raise ConfigError(f"ctx must be >= 2 (the loss predicts token t+1 from tokens <= t), got {self.ctx}",
                              key="ctx")
        for name in ("batch", "steps", "eval_every", "val_batches", "stride"):
            positive(name)
        if self.max_flops is not None:  # None follows the runs directory's cap
            positive("max_flops")
        if self.steps > MAX_STEPS:
            raise ConfigError(f"steps must be at most {MAX_STEPS:.0e} (a billion), got {self.steps}", key="steps")
        for name in ("checkpoint_every", "decimals", "warmup", "seed", "split_seed"):
            non_negative(name)
        for name in ("seed", "split_seed"):  # the batch order's generator fails on a negative seed, after step 0
            if getattr(self, name) > MAX_SEED:
                raise ConfigError(f"{name} must be at most 2**63 - 1, got {getattr(self, name)}", key=name)
        for name in ("grad_clip", "weight_decay", "lora_dropout"):
            non_negative(name, float)
        if self.stride > self.ctx:
            raise ConfigError(f"stride {self.stride} > ctx {self.ctx} would skip tokens between windows")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}", key="lr")
        if self.lr > MAX_LR:
            raise ConfigError(f"lr must be at most {MAX_LR:.0e} (AdamW moves every weight by about lr a step), got "
                              f"{self.lr:g}", key="lr")
        if self.lora_dropout >= 1:
            raise ConfigError(f"lora_dropout must be < 1, got {self.lora_dropout}", key="lora_dropout")
        if not self.full:
            positive("rank")
            if not math.isfinite(self.alpha):
                raise ConfigError(f"alpha must be a finite number, got {self.alpha!r}", key="alpha")
            check_targets(self.targets, error=ConfigError)
        try:
            self.scaler = scaling_rule(self.scaler).name  # canonical: fixed=5e-1 and fixed=0.5 are one setting
        except ScalerNameError as e:
            raise ConfigError(str(e), key="scaler") from None
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}",
                              key="schedule")
        if self.split_mode not in SPLIT_MODES:
            raise ConfigError(f"split_mode must be one of {', '.join(SPLIT_MODES)}, got {self.split_mode!r}",
                              key="split_mode")
        if self.gqa is not None and self.gqa not in GQA_MODES:
            raise ConfigError(f"gqa must be one of {', '.join(GQA_MODES)}, got {self.gqa!r}", key="gqa")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}", key="dtype")
        if self.warmup >= self.steps and self.schedule == "cosine":
            raise ConfigError(f"warmup ({self.warmup}) must be shorter than steps ({self.steps}) for a cosine decay")
        if self.decay is not None and self.schedule != "wsd":
            raise ConfigError(f"decay {self.decay} is the share of the steps a wsd schedule decays over: it needs "
                              f"schedule = wsd, got {self.schedule!r}", key="decay")
        if self.schedule == "wsd":
            if not (isinstance(self.decay, (int, float)) and 0 < self.decay <= 1):
                raise ConfigError(f"decay must be a share of the steps, above 0 and at most 1, got {self.decay!r}",
                                  key="decay")
            if self.warmup > self.stable_steps:
                raise ConfigError(f"warmup ({self.warmup}) must end before the wsd decay starts (after step "
                                  f"{self.stable_steps} of {self.steps}, decay {self.decay:g})")

    @property
    def decay_steps(self) -> int:
        """wsd: the steps of the decay, round(decay x steps), at least 1 (0 for the other schedules)."""
        return max(1, math.floor(self.decay * self.steps + 0.5)) if self.schedule == "wsd" else 0

    @property
    def stable_steps(self) -> int:
        """The steps whose learning rate is the constant schedule's (warmup, then --lr): all of them but a wsd
        decay's, none after the warmup for a cosine decay. A run trained to step k <= stable_steps of this one
        under the constant schedule is this run's first k steps (--continue-from)."""
        return {"constant": self.steps, "wsd": self.steps - self.decay_steps}.get(self.schedule, self.warmup)

    # ---- names and places -----------------------------------------------------------------------------------------
    @property
    def model_tag(self) -> str:
        """The model's short name: 'tiny', 'Qwen2.5-0.5B-Instruct' (hub id or directory: its last component)."""
        return Path(str(self.model).rstrip("/")).name or str(self.model)

    @property
    def run_name(self) -> str:
        """The values that tell runs of a grid apart: model, LoRA rank (or 'full'), learning rate, context."""
        mode = "full" if self.full else f"r{self.rank}"
        return f"{self.model_tag}_{mode}_lr{self.lr:g}_ctx{self.ctx}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path(self.runs_dir) / self.run_name

    @property
    def tensorboard_path(self) -> Path:
        return Path(self.tensorboard_dir) if self.tensorboard_dir is not None else self.run_dir / "tensorboard"

    def to_dict(self) -> dict:
        """Every setting, JSON-ready (what config.json records as the flags)."""
        values = dataclasses.asdict(self)
        values["targets"] = list(self.targets)
        return values

    def trajectory_values(self) -> dict:
        values = self.to_dict()
        return {key: values[key] for key in TRAJECTORY_KEYS}
