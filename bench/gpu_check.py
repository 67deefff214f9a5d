"""The GPU proof kit (issue 36): one prepared command that proves the real-size paths on the first GPU lent to a
session, in about 8 minutes on one H100/H200 (bench/RESULTS.md, GPU, has the exact device call and the standing
order to run it first).

    python3 bench/gpu_check.py OUT                   # on the GPU machine
    python bench/gpu_check.py --cpu-smoke OUT        # the same parts on tiny configs, on a CPU (tests run it)
    python3 bench/gpu_check.py --parts forecast OUT  # some parts again; the summary reads every part's file in OUT

Parts, in this order, each a subprocess of its own (`--part NAME`) with its own timeout, cut further where the wall
limit (--wall-s) would leave a later part less than the least time worth starting it with; a part that fails or is
stopped is recorded, and the next one starts:
  machine     the GPU, library versions, GEMM peaks of bf16, fp16 and fp32 (a large square product; bench's MLP
              shapes) and copy bandwidth, measured in this run
  pytest_gpu  pytest -m gpu (fp32 full-size parity with the safetensors round trip, bf16/autocast criterion)
  train       LoRA steps at full size (Qwen2.5-0.5B shapes, random weights), batch 4 x ctx 768 and 512, bf16, fp16 +
              GradScaler and fp32, ours and HF + PEFT on the same weights; our compiled bf16 step at ctx 768
  forecast    10 samples x 50 trajectories under the number grammar, ours eager and compiled vs HF
              generate(num_return_sequences=10); batch-1 decoding, compiled and eager
  jobs        train.py --plan on a tiny plan: --jobs 2 --gpus 0,0 refused, --jobs 1 --gpus 0 trained on GPU 0

OUT receives 7 files and no folder (the device tool brings back at most 8, at most 2 folders down): one JSON per part
(machine.json, pytest_gpu.json, train.json, forecast.json, jobs.json), summary.md (which goal is met and which falls
short) and log.txt (everything the parts printed); the summary is printed last. Nothing is downloaded: the weights
are random, the forecasts' tokenizer is the product's own where the Qwen2.5 fixture is absent.

OUT may be relative: it is the directory of the command's working directory (the parts run in the repository's).
It is checked before any part runs: a file, a place under a file or one that cannot be made, a summary.md or log.txt
that is not a file, or a part file that this run keeps (a part not in --parts) but that is not a part's JSON, is
refused in one line (exit 2).

Exit status: 0 when every part ran to its end (goals met or not: falling short is a measurement), 1 when a part
failed or was stopped, 2 for bad usage (such as no CUDA device without --cpu-smoke, or an OUT that cannot serve).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_parts import GPU, PARTS, SMOKE, Mode, PartRecord
from bench.gpu_summary import LOG_NAME, SUMMARY_NAME, read_part, write_summary
from common.args import positive_float
from common.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from common.fileio import os_error_text, write_json_atomic

STOP_GRACE_S = 10  # after SIGTERM, before SIGKILL


@dataclass(frozen=True)
class PartSpec:
    name: str
    command: list[str]
    timeout_s: float  # its own limit
    reserve_s: float  # the least time worth starting it with


def part_specs(mode: Mode, out: Path, names) -> list[PartSpec]:
    """The parts' subprocesses, in PARTS order."""
    smoke = ["--cpu-smoke"] if mode is SMOKE else []
    return [PartSpec(name, [sys.executable, str(Path(__file__).resolve()), "--part", name, *smoke, str(out)],
                     mode.timeouts[name], mode.reserves[name]) for name in PARTS if name in names]


def run_parts(specs: list[PartSpec], out: Path, wall_s: float) -> dict[str, str]:
    """Run each part within the wall limit: its timeout is its own, or less where the limit would otherwise leave a
    later part less than its reserve; a part left less than its own reserve is skipped. Each part's OUT/<name>.json
    gets its status (ok, failed, timeout, skipped), exit code, seconds, timeout and the tail of its output.
    Returns name -> status."""
    deadline, statuses = time.monotonic() + wall_s, {}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOG_NAME, "a") as log:
        for i, spec in enumerate(specs):
            left = deadline - time.monotonic() - sum(s.reserve_s for s in specs[i + 1:])
            timeout = min(spec.timeout_s, left)
            if timeout < spec.reserve_s:
                note = f"skipped: the wall limit of {wall_s:.0f} s left it {max(left, 0):.0f} s"
                record = {"part": spec.name, "status": "skipped", "reason": note, "cases": []}
                write_json_atomic(out / f"{spec.name}.json", record)
                echo(log, f"[gpu_check] {spec.name}: {note}\n")
            else:
                echo(log, f"[gpu_check] part {i + 1}/{len(specs)}: {spec.name} (timeout {timeout:.0f} s)\n")
                record = run_part_process(spec, timeout, out, log)
                echo(log, f"[gpu_check] {spec.name}: {record['status']} in {record['seconds']:.0f} s\n")
            statuses[spec.name] = record["status"]
    return statuses


def run_part_process(spec: PartSpec, timeout: float, out: Path, log) -> dict:
    """One part's subprocess, its output echoed and logged as it comes; at its timeout its process group (it and
    whatever it started) gets SIGTERM, then SIGKILL. Completes the part's JSON (written by the part as it goes, or
    made here if it wrote none): cases left "running" were stopped ("timeout") or crashed ("failed")."""
    path, start, tail = out / f"{spec.name}.json", time.monotonic(), collections.deque(maxlen=60)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(spec.command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)

    def pump():
        for line in proc.stdout:
            echo(log, line)
            tail.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:  # a timeout, or Ctrl-C of the driver: the part's whole process group stops with it
        stop_group(proc)
    reader.join(timeout=STOP_GRACE_S)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = {"part": spec.name, "cases": []}
    for case in record.get("cases", []):
        if case.get("status") == "running":
            case["status"] = "timeout" if timed_out else "failed"
    record.update(status="timeout" if timed_out else "ok" if proc.returncode == 0 else "failed",
                  exit_code=proc.returncode, seconds=round(time.monotonic() - start, 1), timeout_s=round(timeout),
                  output_tail="".join(tail)[-4000:])
    write_json_atomic(path, record)
    for stray in out.glob(f".{spec.name}.json.*.tmp"):  # a write the stop cut off (common.fileio.atomic_write)
        stray.unlink()
    return record


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the part's process group (train.py passes it on to its jobs), SIGKILL to what is left of it."""
    if proc.poll() is None:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    signal_group(proc.pid, signal.SIGKILL)  # children of a part that ended (a pytest it ran) go too
    proc.wait()


def signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def echo(log, text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
    log.write(text)
    log.flush()


def run_part(name: str, mode: Mode, out: Path) -> int:
    """The body of `--part NAME`: the part's function, its record saved as it goes; 1 if a case or the part failed."""
    import traceback

    record = PartRecord(out / f"{name}.json", name, mode)
    record.save()
    try:
        PARTS[name](mode, record, out)
    except (Exception, SystemExit) as e:
        record.data["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:400]
        record.save()
        traceback.print_exc()
        return EXIT_FAILED
    return EXIT_FAILED if record.failures else EXIT_OK


def part_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in PARTS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"parts are {', '.join(PARTS)} (comma separated); got {text!r}")
    return names


class BadOut(ValueError):
    """An OUT the check cannot write its files to, or holding files it cannot read."""


def check_out(out: Path, names) -> None:
    """Refuse (BadOut) an OUT that is not a directory and cannot be one, a summary.md or log.txt that is not a
    file, and a part file the summary will read unchanged (a part not run now: `names` are those run) that is not
    that part's JSON; nothing is created."""
    existing = next(d for d in (out, *out.parents) if d.exists() or d.is_symlink())
    if not existing.is_dir():
        where = "is" if existing == out else f"lies under {existing}, which is"
        raise BadOut(f"{out}: {where} not a directory; give a directory for the check's files")
    if existing != out and not os.access(existing, os.W_OK | os.X_OK):
        raise BadOut(f"{out}: cannot be made: {existing} is not writable; give a directory that can be written")
    if existing == out and not os.access(out, os.W_OK | os.X_OK):
        raise BadOut(f"{out}: not writable; give a directory that can be written")
    for name in (SUMMARY_NAME, LOG_NAME):
        if (out / name).exists() and not (out / name).is_file():
            raise BadOut(f"{out / name}: not a file; move it away (the check writes its {name} there)")
    for name in PARTS:
        if name not in names and (out / f"{name}.json").exists():
            try:
                read_part(out / f"{name}.json", name)
            except ValueError as e:
                raise BadOut(f"{e}; move it away, or run that part again (--parts {name})") from None


def make_out(out: Path) -> None:
    """OUT, made (BadOut for what `check_out` could not foresee, such as a full disk)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadOut(f"{out}: cannot be made: {os_error_text(e)}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="directory for the parts' JSON files, summary.md and log.txt")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="the same parts on tiny configs on the CPU (under a minute): proves the script, not the goals")
    p.add_argument("--parts", type=part_list, default=tuple(PARTS),
                   help=f"which parts to run, comma separated (default: all: {','.join(PARTS)}); train brings "
                        "machine along (its GEMM peaks are the MFU's denominators)")
    p.add_argument("--wall-s", type=positive_float, default=None,
                   help=f"wall limit of the whole check in seconds (default: {GPU.wall_s:.0f}; "
                        f"--cpu-smoke {SMOKE.wall_s:.0f})")
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # internal: one part, in its subprocess
    args = p.parse_args(argv)
    mode = SMOKE if args.cpu_smoke else GPU
    if args.part:
        return run_part(args.part, mode, args.out)
    # The parts run in the repository root: a relative OUT is this command's, made absolute before they start.
    args.out = Path(os.path.abspath(args.out))
    names = {*args.parts, *(["machine"] if "train" in args.parts else [])}  # train's MFU needs machine's peaks
    try:
        check_out(args.out, names)
    except BadOut as e:
        print(f"gpu_check.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if mode is GPU:
        import torch

        if not torch.cuda.is_available():
            p.error(f"no CUDA device is available to this torch {torch.__version__}: run it on the GPU machine "
                    "(bench/RESULTS.md, GPU), or add --cpu-smoke")
    wall_s = args.wall_s or mode.wall_s
    # a SIGTERM (a timeout around this command) stops the running part's process group too (run_part_process)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    start = time.monotonic()
    try:
        make_out(args.out)
    except BadOut as e:
        print(f"gpu_check.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    statuses = run_parts(part_specs(mode, args.out, names), args.out, wall_s)
    text = write_summary(args.out, wall_s, time.monotonic() - start)
    print("\n" + text, flush=True)
    return EXIT_OK if all(s == "ok" for s in statuses.values()) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
