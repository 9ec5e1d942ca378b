"""`make bench`: run every benchmarks/bench_*.py in turn. Each measures this project against a peer side by side in
one run, prints its table and adds its ratios to benchmarks/results.json."""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path

here = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    wanted = argv[1:]
    scripts = sorted(here.glob("bench_*.py"))
    if wanted:
        scripts = [s for s in scripts if any(w in s.stem for w in wanted)]
    failed = []
    for script in scripts:
        print(f"\n=== {script.name}", flush=True)
        t0 = time.time()
        saved_argv = sys.argv
        sys.argv = [str(script)]  # the filters given to run.py are not the benchmark's own arguments
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as e:
            if e.code not in (0, None):
                failed.append(script.name)
        except Exception as e:  # keep going: one broken benchmark should not hide the others' numbers
            print(f"{script.name} failed: {type(e).__name__}: {e}", flush=True)
            failed.append(script.name)
        finally:
            sys.argv = saved_argv
        print(f"=== {script.name} took {time.time() - t0:.0f}s", flush=True)
    print(f"\nresults: {here / 'results.json'}")
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
