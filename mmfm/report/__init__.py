"""mmfm.report: routing records, routing analyses and the HTML/JSON reports built from them.

Reports read a run folder (config.yaml, metrics.jsonl, checkpoints/, routing/) and never import
the trainer."""
