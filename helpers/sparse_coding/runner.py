"""Run the numbered notebooks in order with papermill, showing which notebook and cell is running.

`python -m sparse_coding.runner --out build/figures` runs every notebook with its defaults (what `make figures`
does) and records each notebook's run time in figures/run_times.json; `--smoke` overrides each notebook's parameters
with its entry in notebooks/smoke.json and sends figures and data to the output folder, so a smoke run never touches
the committed figures/ or the default data/.

Every cell's output (the notebooks' own progress bars included) goes to `<out>/run.log`; the console shows each cell
as it starts with the elapsed time and, on a terminal, the latest output line. A failing notebook stops the run
with the executed notebook's path and the failing cell."""

from __future__ import annotations

import argparse
import json
import os
import logging
import re
import sys
import time
from pathlib import Path

from .files import update_json
from .paths import repo_root

_CELL = re.compile(r"(Executing|Ending) Cell (\d+)")


def machine() -> dict:
    """The machine a full run's times were measured on (figures/machine.json): CPU model, cores this process may
    use, torch threads, load average when the notebook finished."""
    import platform

    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                 platform.processor() or "unknown") if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else
            os.cpu_count(), "load_average": round(os.getloadavg()[0], 2)}


def notebooks(only: list[str] | None = None) -> list[Path]:
    found = sorted((repo_root() / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if only:
        wanted = {o.zfill(2)[:2] for o in only}
        found = [nb for nb in found if nb.name[:2] in wanted]
    return found


# Notebooks that take a `model` parameter; 00 trains the offline model and 01 is synthetic data, so a run on another
# model (`--model`) skips them.
MODEL_NOTEBOOKS = ("02", "03", "04", "05", "06", "07", "08")


def smoke_parameters(nb: Path, out: Path, model: str | None = None) -> dict:
    """notebooks/smoke.json's "_all" and the notebook's own entry; with a model other than the offline one, also
    the "_model" entries ("_model" for every notebook, "_model:<notebook>" for one), which shrink what a deeper
    model without training revisions needs."""
    table = json.loads((repo_root() / "notebooks" / "smoke.json").read_text())
    params = dict(table.get("_all", {}))
    params.update(table.get(nb.stem, {}))
    if model is not None:
        params.update(table.get("_model", {}))
        params.update(table.get(f"_model:{nb.stem}", {}))
        params["model"] = model
    params["figures_dir"] = str(out / "figures")
    params["data_dir"] = str(out / "data")
    return params


def model_parameters(nb: Path, model: str) -> dict:
    """A full run on another model (`make figures-real`): the model's entry in notebooks/real.json ("_all" and the
    notebook's own: the sizes that fit that model on 2 cores), the model, and figures into figures/<model>/. Raises
    SystemExit naming the file for a model it has no entry for (another model's layer and sizes would not fit)."""
    table = json.loads((repo_root() / "notebooks" / "real.json").read_text())
    if model not in table:
        raise SystemExit(f"notebooks/real.json has no sizes for model {model!r} (it has {sorted(k for k in table if not k.startswith('_'))}); "
                         f"add an entry with its layer and token counts, or run papermill with -p model {model}")
    table = table[model]
    params = dict(table.get("_all", {}))
    params.update(table.get(nb.stem, {}))
    params["model"] = model
    params["figures_dir"] = str(repo_root() / "figures" / model_figures_name(model))
    params["data_dir"] = str(repo_root() / "data")
    return params


def model_figures_name(model: str) -> str:
    """The folder under figures/ of a run on `model`: its short name, or a .gguf file's stem."""
    return Path(model).stem if model.lower().endswith(".gguf") else re.sub(r"[^\w.\-]+", "__", model)


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


class _Console(logging.Handler):
    """papermill's log (cell starts and every output line) -> one console line per cell start, plus the latest
    output line: overwritten in place on a terminal, at most every 20 s otherwise."""

    def __init__(self, name: str, n_cells: int, stream=sys.stdout):
        super().__init__(logging.INFO)
        self.name_, self.n, self.stream, self.t0 = name, n_cells, stream, time.time()
        self.tty = stream.isatty()
        self.last_print = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        m = _CELL.search(msg)
        elapsed = _clock(time.time() - self.t0)
        if m:
            if m.group(1) == "Executing":
                end = "\n" if not self.tty else ""
                self.stream.write(f"\r\033[K[runner] {self.name_} cell {m.group(2)}/{self.n} ({elapsed})" + end
                                  if self.tty else f"[runner] {self.name_} cell {m.group(2)}/{self.n} ({elapsed})\n")
                self.stream.flush()
            return
        lines = [ln for ln in re.split(r"[\r\n]+", msg) if ln.strip()]
        if not lines:
            return
        text = lines[-1].strip()[:110]
        if self.tty:
            self.stream.write(f"\r\033[K[runner] {self.name_} ({elapsed}) {text}")
            self.stream.flush()
        elif time.time() - self.last_print > 20:
            self.stream.write(f"           {text}\n")
            self.stream.flush()
            self.last_print = time.time()


def run_one(nb: Path, out: Path, params: dict, log: logging.Logger, console: bool = True) -> float:
    """Execute one notebook into `out`; returns its seconds. Raises papermill's PapermillExecutionError."""
    import papermill as pm

    n_cells = len(json.loads(nb.read_text())["cells"]) + (1 if params else 0)  # papermill injects a cell
    handler = _Console(nb.name, n_cells) if console else None
    if handler:
        log.addHandler(handler)
    t0 = time.time()
    try:
        pm.execute_notebook(str(nb), str(out / nb.name), parameters=params, cwd=str(nb.parent),
                            kernel_name="python3", progress_bar=False, log_output=True)
    finally:
        if handler:
            log.removeHandler(handler)
            if handler.tty:
                sys.stdout.write("\n")
    return time.time() - t0


def main(argv: list[str] | None = None) -> int:
    from papermill.exceptions import PapermillExecutionError

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="build/figures", help="where executed notebooks and run.log go")
    ap.add_argument("--smoke", action="store_true", help="small parameters from notebooks/smoke.json")
    ap.add_argument("--only", nargs="*", help="notebook numbers to run, e.g. 00 02")
    ap.add_argument("--quiet", action="store_true", help="no per-cell console lines (the log still has them)")
    ap.add_argument("--model", help="run notebooks 02-08 on this model (a .gguf path, 'smollm2-135m', a hub "
                                    "name); without --smoke, sizes from notebooks/real.json, figures into "
                                    "figures/<model>/")
    args = ap.parse_args(argv)

    out = (repo_root() / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    todo = notebooks(args.only)
    if args.model:
        todo = [nb for nb in todo if nb.name[:2] in MODEL_NOTEBOOKS]
        if not todo:  # e.g. `make test NOTEBOOKS=01`: nothing of 02-08 to run on the model
            print("[runner] no model notebook (02-08) among those asked for: nothing to run on --model")
            return 0
    if not todo:
        print("no notebooks matched", file=sys.stderr)
        return 1
    log = logging.getLogger("papermill")
    log.setLevel(logging.INFO)
    log.propagate = False
    file_handler = logging.FileHandler(out / "run.log", mode="w", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(file_handler)
    times: dict[str, float] = {}
    status = 0
    try:
        for i, nb in enumerate(todo, 1):
            params = (smoke_parameters(nb, out, args.model) if args.smoke else
                      model_parameters(nb, args.model) if args.model else {})
            print(f"[runner] {i}/{len(todo)} {nb.name}{' (smoke)' if args.smoke else ''}", flush=True)
            try:
                times[nb.stem] = run_one(nb, out, params, log, console=not args.quiet)
            except PapermillExecutionError as e:
                print(f"[runner] FAILED {nb.name} at cell [{e.exec_count}] (index {e.cell_index}): {e.ename}: "
                      f"{str(e.evalue)[:300]}\n[runner] executed notebook: {out / nb.name}\n[runner] log: "
                      f"{out / 'run.log'}", flush=True)
                status = 1
                break
            print(f"[runner] {nb.name} done in {_clock(times[nb.stem])}", flush=True)
            if not args.smoke:  # each as it finishes: a run stopped later keeps the times of what it finished
                where = repo_root() / "figures" / (model_figures_name(args.model) if args.model else "")
                where.mkdir(parents=True, exist_ok=True)
                update_json(where / "run_times.json", {nb.stem: round(times[nb.stem])})
                update_json(where / "machine.json", machine())
    finally:
        log.removeHandler(file_handler)
        file_handler.close()
    if times:
        print("[runner] run times: " + ", ".join(f"{k} {_clock(v)}" for k, v in times.items()) +
              f"; total {_clock(sum(times.values()))}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
