"""Run the numbered notebooks in order with papermill.

`python -m sparse_coding.runner --out build/figures` runs every notebook with its defaults (what `make figures`
does); `--smoke` overrides each notebook's parameters with its entry in notebooks/smoke.json and sends figures and
data to the output folder, so a smoke run never touches the committed figures/ or the default data/."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .paths import repo_root


def notebooks(only: list[str] | None = None) -> list[Path]:
    found = sorted((repo_root() / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if only:
        wanted = {o.zfill(2)[:2] for o in only}
        found = [nb for nb in found if nb.name[:2] in wanted]
    return found


def smoke_parameters(nb: Path, out: Path) -> dict:
    table = json.loads((repo_root() / "notebooks" / "smoke.json").read_text())
    params = dict(table.get("_all", {}))
    params.update(table.get(nb.stem, {}))
    params["figures_dir"] = str(out / "figures")
    params["data_dir"] = str(out / "data")
    return params


def main(argv: list[str] | None = None) -> int:
    import papermill as pm

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="build/figures", help="where executed notebooks go")
    ap.add_argument("--smoke", action="store_true", help="small parameters from notebooks/smoke.json")
    ap.add_argument("--only", nargs="*", help="notebook numbers to run, e.g. 00 02")
    args = ap.parse_args(argv)

    out = (repo_root() / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    todo = notebooks(args.only)
    if not todo:
        print("no notebooks matched", file=sys.stderr)
        return 1
    for nb in todo:
        params = smoke_parameters(nb, out) if args.smoke else {}
        t0 = time.time()
        print(f"[runner] {nb.name} {'(smoke) ' if args.smoke else ''}{params if params else ''}", flush=True)
        pm.execute_notebook(str(nb), str(out / nb.name), parameters=params, cwd=str(nb.parent),
                            kernel_name="python3", progress_bar=False, log_output=False)
        print(f"[runner] {nb.name} done in {time.time() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
