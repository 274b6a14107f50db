"""Benchmarks: sweeps from YAML (`qdrop bench`), tables and plots (`qdrop report`), and
per-unit / flatness analysis of quantized checkpoints (`qdrop analyze`).

`qdrop bench|report|analyze ...` (cli.py) call bench_main, report_main and analyze_main here; each
takes argv and returns an exit status (`python -m qdrop.bench ...` does the same).
"""
from .config import ConfigError, Run, Sweep, build_sweep, load_sweep
from .runner import SweepRefused, bench_main, read_results, run_sweep


def render_report(results_dir, out=None, plots=True):
    from .report import render_report as _render

    return _render(results_dir, out=out, plots=plots)


def report_main(argv=None) -> int:
    from .report import report_main as _main

    return _main(argv)


def analyze(*args, **kwargs):
    from .analyze import analyze as _analyze

    return _analyze(*args, **kwargs)


def analyze_main(argv=None) -> int:
    from .analyze import analyze_main as _main

    return _main(argv)


__all__ = ["ConfigError", "Run", "Sweep", "SweepRefused", "analyze", "analyze_main", "bench_main", "build_sweep",
           "load_sweep", "read_results", "render_report", "report_main", "run_sweep"]
