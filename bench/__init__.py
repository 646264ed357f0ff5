"""Quarry benchmarks: ``python -m bench --only accuracy [--quick]`` (see ``bench/__main__.py``).

Results (JSON with provenance, PNG, Markdown) are written to ``bench/results/``.
"""
