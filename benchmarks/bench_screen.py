"""TopK's selection through the bfloat16 screen vs through float32, by dictionary shape: where screening pays.

For each shape (d_in, d_sae, k) at batch 4096, float32, on the CPU: the top k of every row's pre-activations of a
freshly made TopK SAE (`make_sae("topk", ...)`, its encoder as training starts) on planted sparse data (bench_train's
`data_pool`, scaled to the width):
  - float32: the dense encoder matmul into a kept buffer, then `kernels.topk_rows` (what the TopK step does without
    the screen);
  - screen: `screening.screened_topk` with kept buffers (the same picks; see its docstring).
Blocks of 3 calls alternate between the two, 3 rounds or more; a ratio is the median of the per-round ratios
(float32 time / screen time), with their [min, max]. Also reported: the candidates rescored per row (median) and
whether `screening.screens` picks the screen at that shape on this machine (the thresholds it uses are set from
these ratios). Reports `screen_vs_float32` and `screen_vs_float32_spread` (objects keyed by shape),
`screen_candidates_per_row` and `screen_chosen`, with `screen_bench_cpu` and `screen_bf16_matmul_speedup` (float32
matmul time over bfloat16's: what `screens` decides on).
Then the public `TopKSAE.encode` under torch.no_grad at d_in=512, d_sae=16384, k=32 (eval mode, dense codes out, as
harvesting calls it), with the screen as `screens` decides vs held off (`screening.SCREEN = False`), interleaved
the same way: `encode_screen_vs_float32` (+ `_spread`; 1 where the screen is not chosen here).
"""

from __future__ import annotations

import os
import statistics
import time

import sparse_coding  # noqa: F401  (before torch: its OpenMP settings apply, as in the notebooks)
import torch

from train_parts import Buffers, data_pool
from rounds import cpu_model, median_and_spread
from sparse_coding.dictionaries import make_sae, screening
from sparse_coding.dictionaries.kernels import topk_rows
from sparse_coding.dictionaries.screening import screened_topk
from sparse_coding.files import update_json
from sparse_coding.paths import repo_root

SCALE = float(os.environ.get("BENCH_SCALE", "1"))
BATCH = 4096
SHAPES = [(128, 4096, 16), (512, 4096, 32), (512, 16384, 32), (768, 24576, 32)]


def timed(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def one_shape(d: int, n: int, k: int, rounds: int) -> dict:
    x = data_pool(d, BATCH, n_batches=1)[0].unsqueeze(0)
    sae = make_sae("topk", d_in=d, d_sae=n, k=k, seed=0)
    with torch.no_grad():
        W, b = sae.encoder_weight(), sae.encoder_bias()
    ws_dense, ws_screen = Buffers(), Buffers()

    def dense():
        pre = torch.baddbmm(b.unsqueeze(1), x, W, out=ws_dense("pre", 1, BATCH, n))
        return topk_rows(pre, k, sorted=False, workspace=lambda *s: ws_dense("group_max", *s))

    def screen():
        return screened_topk(x, W, b, k, workspace=ws_screen)

    counted = []
    rescore = screening._rescore_top

    def counting(*args):
        counted.append(torch.bincount(args[3]).float().median().item())
        return rescore(*args)

    with torch.no_grad():
        # The same picks, up to latents within a few ulps of each other at the k-th place (summation order).
        pre = torch.baddbmm(b.unsqueeze(1), x, W)
        picked_dense, picked_screen = (pre.gather(-1, fn()[1]).sort(-1).values for fn in (dense, screen))
        torch.testing.assert_close(picked_screen, picked_dense, rtol=1e-5, atol=1e-5)
        del pre
        screening._rescore_top = counting
        try:
            screen()
        finally:
            screening._rescore_top = rescore
        per_round = {"dense": [], "screen": []}
        for r in range(rounds):
            for name, fn in (("dense", dense), ("screen", screen)) if r % 2 == 0 else (("screen", screen),
                                                                                       ("dense", dense)):
                per_round[name].append(timed(fn, 3))
    ratio, ratio_spread = median_and_spread(per_round["dense"], per_round["screen"])
    return {"ratio": ratio, "spread": ratio_spread, "candidates": counted[0] if counted else None,
            "chosen": screening.screens(x, n, k), "dense_ms": statistics.median(per_round["dense"]) * 1e3,
            "screen_ms": statistics.median(per_round["screen"]) * 1e3}


def encode_ratio(rounds: int) -> tuple[float, list[float]]:
    d, n, k = 512, 16384, 32
    x = data_pool(d, BATCH, n_batches=1)[0]
    sae = make_sae("topk", d_in=d, d_sae=n, k=k, seed=0).eval()
    per_round = {False: [], None: []}
    with torch.no_grad():
        for r in range(rounds):
            for setting in (False, None) if r % 2 == 0 else (None, False):
                screening.SCREEN = setting
                try:
                    sae.encode(x)  # the first call after a switch: allocator, kernels
                    per_round[setting].append(timed(lambda: sae.encode(x), 3))
                finally:
                    screening.SCREEN = None
    return median_and_spread(per_round[False], per_round[None])


def main() -> None:
    rounds = max(3, round(3 * SCALE))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}, "
          f"bfloat16 matmul {screening.bf16_matmul_speedup():.2f}x float32's here (the screen runs at >= "
          f"{screening._MIN_SPEEDUP}x)")
    results = {}
    for d, n, k in SHAPES:
        key = f"d{d}_n{n}_k{k}"
        res = results[key] = one_shape(d, n, k, rounds)
        print(f"{key:20s} float32 {res['dense_ms']:7.1f} ms  screen {res['screen_ms']:7.1f} ms  "
              f"ratio {res['ratio']:.2f} spread {res['spread']}  candidates/row {res['candidates']}  "
              f"chosen by screens(): {res['chosen']}", flush=True)
    encode, encode_spread = encode_ratio(rounds)
    print(f"TopKSAE.encode d512 n16384 k32 under no_grad: float32 pass / as chosen = {encode:.2f} "
          f"spread {encode_spread}")
    update_json(repo_root() / "benchmarks/results.json", {
        "encode_screen_vs_float32": round(encode, 3),
        "encode_screen_vs_float32_spread": encode_spread,
        "screen_vs_float32": {key: round(r["ratio"], 3) for key, r in results.items()},
        "screen_vs_float32_spread": {key: r["spread"] for key, r in results.items()},
        "screen_candidates_per_row": {key: r["candidates"] for key, r in results.items()},
        "screen_chosen": {key: r["chosen"] for key, r in results.items()},
        "screen_bf16_matmul_speedup": round(screening.bf16_matmul_speedup(), 3),
        "screen_bench_cpu": cpu_model(),
        "screen_bench_load_average": round(os.getloadavg()[0], 2),
    })


if __name__ == "__main__":
    main()
