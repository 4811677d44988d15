"""Evaluation: benchmark tasks scored exactly as lm-evaluation-harness scores them, and perplexity.

    tasks.py       the tasks (ARC, HellaSwag, MMLU, TruthfulQA MC2, Winogrande, GSM8K): prompts and metrics
    data.py        their rows, from local JSONL / Parquet files in the hub's schemas or from the hub
    fewshot.py     few-shot examples drawn as lm-eval draws them
    scoring.py     log-likelihoods with a shared prefix run once; greedy generation until stop sequences
    metrics.py     acc, acc_norm, mc2, exact match, standard errors
    evaluator.py   prepare prompts, evaluate a model, aggregate groups
    report.py      results JSON, Markdown, comparison of two reports
    perplexity.py  sliding-window perplexity and bits per byte
"""
