"""``python -m bench``: every benchmark, results written to bench/results.md."""

from bench import cold_start, refresh, send_memory, send_path

if __name__ == "__main__":
    cold_start.run()
    send_path.run()
    send_memory.run()
    refresh.run()
    print("\nresults written to bench/results.md")
