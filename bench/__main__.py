"""``python -m bench [--write] [NAME ...]``: the benchmarks (all, or the named ones), one at a time.

``--write`` updates bench/results.md (a tracked file); without it the figures are only printed.
``python -m bench chaos [options]`` runs the soak-and-chaos run alone (see ``bench/chaos.py``, ``--help``);
it is not part of the default run, which measures one thing at a time. ``python -m bench scale [--quick]``: the
scale and cost model (``bench/scale.py``, ``--help``).
"""

import argparse
import sys

NAMES = ("cold_start", "send_path", "send_memory", "download_memory", "refresh", "notifications")


def main(argv: list[str]) -> int:
    if argv[:1] == ["chaos"]:
        from bench import chaos

        return chaos.main(argv[1:])
    if argv[:1] == ["scale"]:
        from bench import scale

        return scale.main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench", description="Run the benchmarks of the measured bars "
                                "(figures as ratios measured in one run). `python -m bench chaos --help`: the "
                                "load-and-faults run; `python -m bench scale --help`: the scale and cost model.")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"benchmarks to run (default: all): {', '.join(NAMES)}")
    p.add_argument("--write", action="store_true", help="update bench/results.md with the figures")
    a = p.parse_args(argv)
    unknown = [n for n in a.names if n not in NAMES]
    if unknown:
        p.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    import importlib

    from bench import _stack

    _stack.WRITE[0] = a.write
    for name in a.names or NAMES:
        importlib.import_module(f"bench.{name}").run()
    print("\nresults written to bench/results.md" if a.write else "\n(figures printed; --write updates bench/results.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
