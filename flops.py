"""FLOPs of fine-tuning Qwen2.5 with LoRA, counted from the model's own modules, and the FLOP ledger of all runs.

    python flops.py                              # per-layer table, Qwen2.5-0.5B, batch 4 x ctx 512, LoRA r=4 on q/v
    python flops.py --rank 8 --ctx 768 --steps 2000
    python flops.py --model tiny --rank 0 --json
    python flops.py --gqa mha                    # k/v counted as multi-head, as the coursework reports do
    python flops.py --runs runs                  # what every run spent (train, eval, forecast), what is left of 1e17
    python flops.py --runs runs --steps 3000     # ... and whether a planned run of 3000 steps still fits
    python flops.py --runs runs --settle         # release the reservations of runs whose process is gone
    python flops.py --plan plans/coursework.toml # each stage's FLOPs, and whether the study fits

The model is built on the meta device (shapes only, no weights), so this takes a fraction of a second beyond
importing torch. Counting conventions: `qwen_mini/flops.py`; the ledger: `ledger/`.
"""
import sys

import accounting.cli


def main(argv: list[str] | None = None) -> int:
    return accounting.cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
