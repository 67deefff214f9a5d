"""The FLOP-ledger flags of the command lines (--runs-dir, --max-flops with --change-max-flops, --gqa, --no-budget):
declared here once, with the type, metavar and choices every tool shares; each tool gives the help text that fits
it."""
from __future__ import annotations

from common.args import flop_count
from qwen_mini.flops import GQA_MODES

from .cap import CAP_NAME, CHANGE_FLAG

MAX_FLOPS_HELP = (f"FLOP budget of everything under --runs-dir together. A runs directory has one cap, recorded in "
                  f"its {CAP_NAME} by the first job that gives one (this flag, or a plan's max_flops); leave it out to "
                  f"follow that cap (default: the recorded cap, else 1e17); another value is refused unless "
                  f"{CHANGE_FLAG} is given")
CHANGE_MAX_FLOPS_HELP = (f"make --max-flops the runs directory's cap even though another one is recorded (refused if "
                         f"it is below what is already spent or reserved); the change is kept in {CAP_NAME}")


def add_budget_arguments(group, *, runs_dir: str | None = None, max_flops: str | None = None,
                         change_max_flops: str | None = None, gqa: str | None = None, no_budget: str | None = None,
                         runs_dir_default: str | None = None, max_flops_default: int | None = None) -> None:
    """Add to `group` (a parser or an argument group), in this order, each ledger flag whose help text is given:
    --runs-dir DIR, --max-flops FLOPS (an exact int; default None: the runs directory's recorded cap, else 1e17),
    --change-max-flops (CHANGE_MAX_FLOPS_HELP fits every tool), --gqa {real,mha} (default None: the ledger's
    convention) and --no-budget. A tool that places another flag between them calls this once per run of flags."""
    if runs_dir is not None:
        group.add_argument("--runs-dir", default=runs_dir_default, metavar="DIR", help=runs_dir)
    if max_flops is not None:
        group.add_argument("--max-flops", type=flop_count, default=max_flops_default, metavar="FLOPS", help=max_flops)
    if change_max_flops is not None:
        group.add_argument(CHANGE_FLAG, action="store_true", help=change_max_flops)
    if gqa is not None:
        group.add_argument("--gqa", choices=GQA_MODES, default=None, help=gqa)
    if no_budget is not None:
        group.add_argument("--no-budget", action="store_true", help=no_budget)
