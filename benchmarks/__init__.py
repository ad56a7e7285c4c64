"""Benchmarks of the real-size models (GPU) and of the converters (CPU): ``python -m benchmarks.bench MODE``.

Not installed and not shipped: run from the repository root. ``harness`` (timing, floors, records),
``families`` and ``models`` (what is built and how it is prompted), ``modes/`` (one module per subcommand),
``report`` (docs/performance.md's tables from ``results/``). How to run and read them: docs/performance.md.
"""
