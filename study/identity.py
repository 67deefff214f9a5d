"""A study's identity: besides its plan's text, what decides its results — the command line's settings over the plan
(`train.py --plan P --data users.h5 --rank 8`) and the bytes of every data file it trains on — so that a plan run
again with other settings or other data never takes the old study's runs and forecasts for its own (issue 35).

Every data file of a study is read here first (its header), so one that is missing, not of the schema, or too short
for a forecast stage's context + horizon is refused in one line before any FLOP is spent (`check_forecasts_fit`).

A study directory (<runs_dir>/<name>) holds one identity, recorded in its study.json ("plan_sha256", "overrides",
"data"). `study_for` picks where a plan runs: its own directory when that is free or holds the same identity, else
a study of its own beside it, <name>-<key> (the key a digest of the identity), saying so: docs/studies.md's flow (the
demo plan, then the same plan with --data) gives two studies side by side, each with its own results.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from common.fileio import UnreadableFile, os_error_text, read_json, sha256_file
from data.dataset import TooShort, check_forecast_fits
from data.lotka_volterra import DataError, default_data_file, trajectories_shape

from .plan import STUDY_FILE, Plan, PlanError, forecast_config

# Command-line settings that change how or where a run is computed or logged, never its numbers: left out of the
# identity, so that a study stopped on one machine continues on another, or with TensorBoard turned on.
NOT_IN_RESULTS = ("device", "compile", "activation_checkpointing", "checkpoint_every", "tensorboard")


@dataclass(frozen=True)
class StudyIdentity:
    plan_sha256: str
    overrides: dict | None  # the command line's settings that change results (None: a record that predates them)
    data: list | None  # [{"path": str or None (the built-in simulated set), "sha256": str}]; None: not known

    @property
    def key(self) -> str:
        """8 hex digits of the whole identity: the suffix of a study of its own."""
        text = json.dumps({"plan": self.plan_sha256, "overrides": self.overrides,
                           "data": sorted(d["sha256"] for d in self.data or [])}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    def matches(self, other: StudyIdentity) -> bool:
        """The same plan, settings and data bytes; what a record does not know is not held against it."""
        return (self.plan_sha256 == other.plan_sha256
                and (self.overrides is None or other.overrides is None or self.overrides == other.overrides)
                and (self.data is None or other.data is None
                     or sorted(d["sha256"] for d in self.data) == sorted(d["sha256"] for d in other.data)))

    def describe(self) -> str:
        """'on lv.h5 (sha256 0123456789ab...) with --rank 8', for the line that tells two studies apart."""
        if self.data is None:
            data = "on data it did not record"
        else:
            data = "on " + " and ".join("the built-in simulated data set" if d["path"] is None else
                                        f"{d['path']} (sha256 {d['sha256'][:12]}...)" for d in self.data)
        if self.overrides is None:
            return f"{data} (its command-line settings not recorded)"
        if not self.overrides:
            return f"{data} with the plan's own settings"
        flags = " ".join(f"--{k.replace('_', '-')} {_flag_value(v)}" for k, v in self.overrides.items())
        return f"{data} with {flags}"

    def record(self) -> dict:
        """study.json's "overrides" and "data"."""
        return {"overrides": self.overrides, "data": self.data}


def _flag_value(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


_SHA256: dict[tuple, str] = {}  # (path, mtime, size) -> sha256: a study's record is written after every stage


def _sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _SHA256:
        _SHA256[key] = sha256_file(path)
    return _SHA256[key]


def data_values(plan: Plan) -> list:
    """Every data setting the plan's runs train on ([train], with the command line's, and the stages'), in order,
    each once; None is the built-in simulated set."""
    values = [plan.train.get("data")]
    for stage in plan.stages:
        if stage.kind == "train":
            values += ([stage.settings["data"]] if "data" in stage.settings else []) + list(stage.grid.get("data", []))
    return list(dict.fromkeys(values))


def data_files(plan: Plan) -> list[tuple[str | None, Path, tuple]]:
    """(data setting, its file, the file's (N, T, 2) shape) of every data setting of the plan; a file that is missing
    or not an h5 file of the schema raises PlanError naming it."""
    files = []
    for value in data_values(plan):
        try:
            path = default_data_file() if value is None else Path(value)
            files.append((value, path, trajectories_shape(path)))
        except DataError as e:
            raise PlanError(f"{plan.path}: data: {e}") from None
        except OSError as e:
            raise PlanError(f"{plan.path}: data: {os_error_text(e)}") from None
    return files


def check_forecasts_fit(plan: Plan) -> None:
    """Refuse (PlanError) data whose trajectories are shorter than a forecast stage's context + horizon, before any
    run trains for a forecast that could never be made."""
    for _value, path, shape in data_files(plan):
        for stage in (s for s in plan.stages if s.kind == "forecast"):
            config = forecast_config(plan, stage)
            try:
                check_forecast_fits(shape[1], config.context, config.horizon, f"data {path}")
            except TooShort as e:
                raise PlanError(f"{plan.path}: stage {stage.name}: {e}") from None


def study_identity(plan: Plan) -> StudyIdentity:
    """The plan's identity: its text, its command-line settings that change results, its data files' bytes. A data
    file that is missing or not an h5 file of the schema raises PlanError naming it, before anything runs."""
    data = [{"path": None if value is None else str(value), "sha256": _sha256(path)}
            for value, path, _ in data_files(plan)]
    overrides = {k: v for k, v in plan.overrides.items() if k not in NOT_IN_RESULTS and k != "data"}
    return StudyIdentity(plan.digest, json.loads(json.dumps(overrides)), data)


def recorded_identity(study: dict, study_dir: Path) -> StudyIdentity:
    """The identity a study.json records; one written before identities were recorded gives the data its runs'
    config.json name (their sha256) and no settings. A record whose "data" or "overrides" is not of their form raises
    PlanError naming it."""
    if "data" in study:
        data, overrides = study["data"], study.get("overrides")
        if not (isinstance(data, list) and all(isinstance(d, dict) and isinstance(d.get("sha256"), str)
                                                and isinstance(d.get("path"), (str, type(None))) for d in data)
                and isinstance(overrides, (dict, type(None)))):
            raise PlanError(f"{study_dir / STUDY_FILE}: its \"data\" ({data!r:.80}) or \"overrides\" "
                            f"({overrides!r:.80}) "
                            "is not what train.py writes (a list of {\"path\", \"sha256\"}; a table of settings): "
                            "restore the record, or move it away to start the study again")
        return StudyIdentity(study["plan_sha256"], overrides, data)
    data = {}
    for stage in study.get("stages", []):
        for run in stage.get("runs", []) if isinstance(stage, dict) else []:
            try:
                config = read_json(Path(run) / "config.json")
            except (OSError, UnreadableFile):
                continue
            if isinstance(config, dict) and isinstance(config.get("data_sha256"), str):
                data[config["data_sha256"]] = {"path": config.get("data"), "sha256": config["data_sha256"]}
    return StudyIdentity(study["plan_sha256"], None, list(data.values()) or None)


def study_for(plan: Plan, log=print) -> Plan:
    """The plan as it runs: in its study directory (<runs_dir>/<name>) when that is free or holds this identity, else
    in a study of its own, <name>-<key>, which `log` announces. A directory holding another plan's study is left to
    `study.run.check_study_dir` to refuse."""
    identity = study_identity(plan)
    own = dataclasses.replace(plan, name=f"{plan.name}-{identity.key}")
    if (own.study_dir / STUDY_FILE).is_file():
        log(f"[plan] {plan.study_dir}/ holds this plan's study on other settings or data; this command's "
            f"({identity.describe()}) is the study in {own.study_dir}/, continued")
        return own
    try:
        study = read_json(plan.study_dir / STUDY_FILE)
    except (OSError, UnreadableFile):
        return plan  # no study there yet; an unreadable record is check_study_dir's to name
    if not isinstance(study, dict) or study.get("plan_sha256") != plan.digest:
        return plan
    try:
        recorded = recorded_identity(study, plan.study_dir)
    except PlanError:
        return plan  # a damaged record: check_study_dir names it
    if recorded.matches(identity):
        return plan
    log(f"[plan] {plan.study_dir}/ holds this plan's study {recorded.describe()}; this command's "
        f"({identity.describe()})"
        f" would give other results, so it runs as a study of its own: {own.study_dir}/ (that one is left as it is)")
    return own
