"""The worker processes of benchmarks/bench_mining.py: each side loads once in its own process and answers timed
`run` requests on stdin, so the two sides alternate on one machine without sharing a Python heap."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

from mining_sides import BATCH, MARK, PEERS, WORK, Ours, _reset_peak, _status

BENCH = Path(__file__).resolve().parent / "bench_mining.py"


def worker(side: str, n_contexts: int, n_features: int) -> None:
    """Load once, warm up, then answer `run` / `quantile_acts` / `quit` lines on stdin with MARK + JSON lines."""
    import torch

    from sparse_coding.files import load_json, load_tensors

    warnings.simplefilter("ignore")
    info = load_json(WORK / "prep.json")
    tokens = load_tensors(WORK / "tokens.safetensors")["tokens"].long()[:n_contexts]
    features = list(range(n_features))

    def reply(obj) -> None:
        sys.stdout.write(MARK + json.dumps(obj) + "\n")
        sys.stdout.flush()

    # Timed workers warm up on all the tokens (BENCH_WARM_FULL=1): a first full run pays for the allocator's heap
    # growing to its steady size (page faults in the forward too, ~0.5 s here), which the ideal, timed right after
    # our run in each round, never pays. The memory probes keep the short warm-up (their peak is over the run).
    full = os.environ.get("BENCH_WARM_FULL") == "1"
    if side == "ours":
        impl = Ours(info, tokens)
        impl.run(tokens if full else tokens[: 2 * BATCH])  # warm-up: lazy imports, first-call allocations
        impl.ideal(tokens[:BATCH])
        impl.encode_parts(tokens[:BATCH])
    else:
        impl = PEERS[side](info, tokens)
        impl.run(tokens if full else tokens[: 2 * BATCH], features if full else features[:8])
    last = None
    reply({"ready": True, "threads": torch.get_num_threads()})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if cmd in ("run", "run+ideal"):
            last = None
            gc.collect()
            exact = _reset_peak()
            start = _status("VmRSS")
            out, last = impl.run(tokens) if side == "ours" else impl.run(tokens, features)
            out["peak_gib"] = _status("VmHWM")
            out["start_gib"] = start
            out["peak_delta_gib"] = out["peak_gib"] - start
            out["peak_exact"] = exact
            out["load"] = os.getloadavg()[0]
            if cmd == "run+ideal":
                out["ideal_seconds"] = impl.ideal(tokens)
                out.update(impl.encode_parts(tokens))
            if side != "ours":
                last = None  # the peer's results are not needed again; free them before the next round
            reply(out)
        elif cmd == "quantile_acts":
            reply(impl.quantile_acts(last))
        else:
            reply({"error": f"unknown command {cmd!r}"})


class Worker:
    """A worker subprocess for one side; its stderr goes to a log file shown when it fails."""

    def __init__(self, side: str, n_contexts: int, n_features: int, tag: str, env: dict | None = None):
        self.side = side
        self.log_path = WORK / f"worker-{tag}.log"
        self.log = open(self.log_path, "w")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH), "--worker", side, "--contexts", str(n_contexts),
             "--features", str(n_features)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            text=True, env=env)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.log.flush()
        tail = self.log_path.read_text()[-3000:]
        raise RuntimeError(f"{self.side} worker exited (code {self.proc.wait()}); its stderr ends with:\n{tail}")

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        out = self.read()
        if "error" in out:
            raise RuntimeError(out["error"])
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.log.close()

