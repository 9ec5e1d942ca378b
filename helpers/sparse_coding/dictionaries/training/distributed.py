"""Training one sweep across processes: ensemble members spread over ranks.

    torchrun --nproc_per_node 2 -m sparse_coding.dictionaries.training.distributed --config job.json

Members never interact (see dictionaries.base), so a sweep splits cleanly: rank r trains a contiguous slice of the members as
its own sub-ensemble, built from the same seeds and hyperparameters (a member's initial weights depend only on its
seed), and every rank reads the same batches (the same source and training seed). Resampling draws from per-member
generators, so a member resamples identically wherever it lives. At the end the weights, firing counters and logs
are all-gathered and rank 0 saves the whole sweep with saelens_io.save_sweep. gloo on CPU, NCCL on CUDA (each rank on
cuda:LOCAL_RANK).

On CPU (tests/dictionaries/test_distributed.py, one thread per process) the saved sweep of 2 ranks equals the
one-process run bit for bit when a member's weight count is a multiple of the SIMD width (d_in, d_sae multiples of
16); with ragged sizes the elementwise kernels (fused Adam, renormalisation) treat the last partial vector of a
differently sized tensor differently, and members agree to rounding instead (the test checks 1e-6).

job.json:
    {"kind": "relu", "d_sae": 64 (or "ratio": 4), "hparams": {"l1_coef": [..], "seed": [..]},
     "data": {"activations": "<harvest folder>"} or {"tensor": "<file.safetensors>", "key": "acts"},
     "batch_size": 4096, "input_scale": "auto" (default) | 1.0, "out": "<sweep folder>", "device": "cpu" | "cuda",
     "metadata": {...}, "state_dir": "<folder>" (optional), "train": {"steps": .., "lr": .., ...}}
"""

from __future__ import annotations

import argparse
import io
import os
from typing import Any, Mapping

import pandas as pd
import torch
import torch.distributed as dist

from ...arguments import checked
from ...activations.store import ActivationStore
from ...files import load_json, load_tensors
from ...paths import resolve
from ..base import EnsembleSAE
from ..factory import broadcast, make_sae
from ..saelens_io import save_sweep
from .loop import train_sae
from .sources import Batches
from .settings import TrainSettings

HISTORY_FILE = "history.csv"


def member_slice(n_members: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of the members rank `rank` trains: contiguous, sizes differing by at most one."""
    if world_size > n_members:
        raise ValueError(f"{world_size} processes for {n_members} members: every rank needs a member; use "
                         f"--nproc_per_node {n_members} or fewer")
    base, extra = divmod(n_members, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def _per_member(hparams: Mapping[str, Any]) -> list[dict[str, Any]]:
    if "seed" not in hparams:
        raise ValueError("hparams needs 'seed' (an int or one per member): members are built from their seeds")
    return broadcast(dict(hparams))


def _all_gather_rows(t: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every rank's `t` along dim 0 (rank r holds counts[r] rows), padding to one shape for the
    collective (NCCL's all_gather needs equal shapes)."""
    pad = max(counts)
    buf = torch.zeros(pad, *t.shape[1:], dtype=t.dtype, device=t.device)
    buf[:t.shape[0]] = t
    parts = [torch.empty_like(buf) for _ in counts]
    dist.all_gather(parts, buf)
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


def _all_gather_text(text: str, device: torch.device, world: int) -> list[str]:
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8, device=device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.long, device=device))
    counts = [int(s) for s in sizes]
    parts = [torch.zeros(max(counts), dtype=torch.uint8, device=device) for _ in range(world)]
    buf = torch.zeros(max(counts), dtype=torch.uint8, device=device)
    buf[:data.numel()] = data
    dist.all_gather(parts, buf)
    return [bytes(p[:n].cpu().tolist()).decode("utf-8") for p, n in zip(parts, counts)]


@checked
def train_distributed(kind: str, d_in: int, batches: Batches, hparams: Mapping[str, Any],
                      settings: TrainSettings | None = None, *, d_sae: int | None = None,
                      ratio: float | None = None, out: str | os.PathLike | None = None,
                      device: str | torch.device | None = None, tied: bool = False, pre_bias: bool = True,
                      state_dir: str | os.PathLike | None = None, metadata: Mapping[str, Any] | None = None,
                      overwrite: bool = False, progress: bool | None = None,
                      **fields: Any) -> tuple[EnsembleSAE, pd.DataFrame]:
    """Train the sweep `kind` x `hparams` with members spread over the torchrun ranks; every rank returns the whole
    trained ensemble and log, rank 0 also saves it to `out` (SAELens layout, input_scale folded in, history.csv).

    Outside torchrun (no RANK/WORLD_SIZE in the environment) it is one process training everything. batches: any
    train_sae source; every rank must see the same batches (a dataset tensor or ActivationStore with the same
    seed, a pure callable). state_dir: each rank keeps its slice's training state under members-LO-HI/.
    settings: how every member trains (`TrainSettings`, as train_sae; its fields as keywords override it), the same
    object on every rank; input_scale "auto" gives every rank the same number (`default_input_scale`, seeded).
    progress: a bar on rank 0 by default."""
    cfg = TrainSettings.build(settings, **fields)
    if cfg.loss != "local":
        raise ValueError(f"train_distributed trains on activations (loss='local'), got loss={cfg.loss!r}: train an "
                         f"end-to-end SAE with train_sae(..., model=..., hook_name=...) or train_e2e_sweep")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    own_group = False
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        own_group = True
    try:
        members = _per_member(hparams)
        lo, hi = member_slice(len(members), rank, world)
        mine = members[lo:hi]
        keys = {k for h in mine for k in h}
        sub = make_sae(kind, d_in, d_sae, ratio=ratio, tied=tied, pre_bias=pre_bias, device=device,
                       **{k: [h[k] for h in mine] for k in keys})
        ck = resolve(state_dir) / f"members-{lo:03d}-{hi:03d}" if state_dir is not None else None
        hist = train_sae(sub, batches, cfg, state_dir=ck, progress=rank == 0 if progress is None else progress)
        hist["member"] += lo

        full = make_sae(kind, d_in, d_sae, ratio=ratio, tied=tied, pre_bias=pre_bias, device=device,
                        **{k: [h[k] for h in members] for k in keys})
        if world > 1:
            counts = [member_slice(len(members), r, world)[1] - member_slice(len(members), r, world)[0]
                      for r in range(world)]
            state = {name: _all_gather_rows(t.contiguous(), counts) for name, t in sub.state_dict().items()}
            texts = _all_gather_text(hist.to_csv(index=False), device, world)
            hist = pd.concat([pd.read_csv(io.StringIO(t)) for t in texts], ignore_index=True)
        else:
            state = sub.state_dict()
        full.load_state_dict(state)
        full.dead_window, full.input_scale, full.fitted = sub.dead_window, sub.input_scale, sub.fitted
        full.eval()
        hist = hist.sort_values(["step", "member"], kind="stable").reset_index(drop=True)
        if out is not None and rank == 0:
            save_sweep(full, out, metadata=metadata, overwrite=overwrite,
                       files={HISTORY_FILE: hist.to_csv(index=False)},
                       extra={"distributed": {"world_size": world, "backend": dist.get_backend() if world > 1
                                              else None}})
        if world > 1:
            dist.barrier()  # nobody leaves (and tears the group down) before the sweep is on disk
        return full, hist
    finally:
        if own_group:
            dist.destroy_process_group()


def _load_data(spec: Mapping[str, Any]) -> tuple[Any, int]:
    if "activations" in spec:
        store = ActivationStore(spec["activations"])
        return store, store.d
    if "tensor" in spec:
        key = spec.get("key", "acts")
        tensors = load_tensors(spec["tensor"])
        if key not in tensors:
            raise ValueError(f"{spec['tensor']} has no tensor {key!r} (has {', '.join(tensors)}); set data.key")
        return tensors[key].float(), int(tensors[key].shape[1])
    raise ValueError("job data must be {'activations': <harvest folder>} or {'tensor': <file.safetensors>}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="job.json (see the module docstring)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    job = load_json(args.config)
    missing = [k for k in ("kind", "hparams", "data", "batch_size", "out") if k not in job]
    if missing:
        raise ValueError(f"{args.config} is missing {', '.join(missing)} (see python -m sparse_coding.dictionaries.training.distributed -h)")
    batches, d_in = _load_data(job["data"])
    # The job's training settings, checked once: every rank builds the same object (and the same "auto" scale).
    cfg = TrainSettings.from_json({**job.get("train", {}), "batch_size": job["batch_size"],
                                   "input_scale": job.get("input_scale", "auto"),
                                   **({"dead_window": job["dead_window"]} if job.get("dead_window") else {})})
    train_distributed(job["kind"], d_in, batches, job["hparams"], cfg, d_sae=job.get("d_sae"), ratio=job.get("ratio"),
                      out=job["out"], device=job.get("device"), tied=bool(job.get("tied", False)),
                      state_dir=job.get("state_dir"), metadata=job.get("metadata"),
                      overwrite=bool(job.get("overwrite", False)), progress=bool(job.get("progress", False)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
