"""A budgeted study: a plan of stages run under the FLOP ledger (`study.plan`), and one report of a runs directory
(`study.report`). Above training and forecasting in the import graph; train.py, flops.py and report.py use it."""
