"""Stage `eval`: measuring a library (Qiu et al.'s Tables I-IV).

    evaluate.py  `chainlora eval`: perplexity per task and system, selector accuracy, task metrics
    judge.py     `chainlora judge`: helpfulness 1-6 by an LLM judge
    annotate.py  `chainlora annotate`: blind human-evaluation sheets and their results
    report.py    `chainlora report`: LIB/report.html and report.md from the saved results
    sweep.py     the chain-vs-mixed budget sweep's tables and plot (bench/chain_vs_mixed.py, report --sweep)
    tables.py    the evaluation's tables for the terminal

Import from the modules (`from chainlora.eval.evaluate import evaluate`, `chainlora.eval.report.build`):
the package re-exports nothing, since its functions share their modules' names.
May import: core, data, library, inference, train.
"""
