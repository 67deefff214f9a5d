"""The FLOP-ledger flags of the command lines (--runs-dir, --max-flops, --gqa, --no-budget): declared here once, with
the type, metavar and choices every tool shares; each tool gives the help text that fits it."""
from __future__ import annotations

from common.args import flop_count
from qwen_mini.flops import GQA_MODES

from .records import DEFAULT_BUDGET

MAX_FLOPS_HELP = "FLOP budget of everything under --runs-dir together (default: 1e17)"


def add_budget_arguments(group, *, runs_dir: str | None = None, max_flops: str | None = None,
                         gqa: str | None = None, no_budget: str | None = None, runs_dir_default: str | None = None,
                         max_flops_default: int | None = DEFAULT_BUDGET) -> None:
    """Add to `group` (a parser or an argument group), in this order, each ledger flag whose help text is given:
    --runs-dir DIR, --max-flops FLOPS (an exact int), --gqa {real,mha} (default None: the ledger's convention) and
    --no-budget. A tool that places another flag between them calls this once per run of flags."""
    if runs_dir is not None:
        group.add_argument("--runs-dir", default=runs_dir_default, metavar="DIR", help=runs_dir)
    if max_flops is not None:
        group.add_argument("--max-flops", type=flop_count, default=max_flops_default, metavar="FLOPS", help=max_flops)
    if gqa is not None:
        group.add_argument("--gqa", choices=GQA_MODES, default=None, help=gqa)
    if no_budget is not None:
        group.add_argument("--no-budget", action="store_true", help=no_budget)
