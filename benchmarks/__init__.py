"""The benchmark scripts, a package so that they share ``benchmarks.common`` by a normal import.

Run each as a module from the repository root, e.g. ``python -m benchmarks.bench_scoring`` or
``python -m benchmarks.quality.run_hybrid`` (pyarrow also installs a top-level package named
``benchmarks``; from the root, this one comes first).
"""
