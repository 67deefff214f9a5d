"""Running a budgeted study: a plan of stages (`study.plan`), where it stands on disk (`study.standing`), its FLOPs
counted before it runs (`study.estimate`), run under the FLOP ledger (`study.run`; a stage's runs as parallel jobs:
`study.jobs`, `study.worker`; a successive-halving search: `study.halving`'s rules, `study.search`), which run wins
(`study.selection`), a study's identity (`study.identity`), and train.py --plan's command line (`study.cli`). Above
training and forecasting in the import graph; the report (`reporting`) reads what a study left on disk and never
imports the runner."""
