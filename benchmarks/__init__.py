"""Cross-framework benchmarks for topk-core (run from a checkout: ``python -m benchmarks``).

Not installed with the package (PyPI has an unrelated package named
``benchmarks``); see :mod:`benchmarks.cli` for the options.
"""
