"""The report of a runs directory (`python report.py RUNS_DIR`): it reads what training runs, forecasts, studies and
the FLOP ledger left on disk and writes one Markdown report with its figures (`reporting.report.write_report`). It
never trains or forecasts, and never imports the study runner: only `study.plan`'s file name and `study.selection`'s
criteria, so a stage's winner is judged by the same rule that chose it.

    report.py            the report, section by section (write_report)
    setup.py, findings.py   the title, setup and architecture; the Findings and Conclusions
    runs.py, stages.py   the runs of each stage, the seed noise, per-stage tables and figures
    search.py            a successive-halving stage's rungs
    results.py           forecasts found on disk; forecasts.py their tables, uncertainty.py the bootstrap intervals
    flops.py             the ledger against the budget and the FLOP section in the coursework reports' style
    figures.py, format.py   plots and number formatting shared by the sections
"""
