"""A budgeted study: a plan of stages (`study.plan`), its FLOPs counted before it runs (`study.estimate`), run under
the FLOP ledger (`study.run`), and one report of a runs directory (`study.report`); the command lines over them are
`study.cli` (train.py --plan) and `study.flops_cli` (flops.py). Above training and forecasting in the import graph;
train.py, flops.py and report.py use it."""
