"""``python -m bench``: every benchmark, results written to bench/results.md.

``python -m bench chaos [options]`` runs the soak-and-chaos run alone (see ``bench/chaos.py``); it is
not part of the default run, which measures one thing at a time.
"""

import sys

from bench import cold_start, download_memory, notifications, refresh, send_memory, send_path

if __name__ == "__main__":
    if sys.argv[1:2] == ["chaos"]:
        from bench import chaos

        sys.exit(chaos.main(sys.argv[2:]))
    cold_start.run()
    send_path.run()
    send_memory.run()
    download_memory.run()
    refresh.run()
    notifications.run()
    print("\nresults written to bench/results.md")
