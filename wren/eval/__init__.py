"""Evaluation: perplexity and bits per byte, multiple choice, GSM8K, and a training run's report card.

loading.py      open a checkpoint for scoring (device, dtype); the token that starts a document
perplexity.py   `wren eval ppl`: loss and bits per byte on {"text"} JSONL
choice_data.py  reading {"subject", "question", "choices", "answer"} rows, with file:line errors
choice.py       `wren eval choice`: answer letters scored by their logits, per subject
gsm8k.py        `wren eval gsm8k`: greedy answers through the engine, exact match on the number
records.py      evals.jsonl in a run directory: `--save` appends, the report reads
run_dir.py      what a training run directory holds: its config, metrics and final model
plots.py        training curves as PNG files (matplotlib, the `report` extra)
report.py       `wren eval report`: the Markdown report card of a run
tables.py       small aligned text tables for the terminal
"""
