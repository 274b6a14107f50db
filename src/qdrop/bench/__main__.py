"""python -m qdrop.bench bench|report|analyze ... (the same as `qdrop bench|report|analyze`)."""
import sys

from . import analyze_main, bench_main, report_main

COMMANDS = dict(bench=bench_main, report=report_main, analyze=analyze_main)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m qdrop.bench {bench,report,analyze} ...", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
