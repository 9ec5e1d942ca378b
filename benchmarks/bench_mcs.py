"""MCS and 1:1 matching at dictionary scale (issue: comparing dictionaries, part 1).

Cases, each in its own subprocess so that its peak resident memory (VmHWM) is its own:
  perm16k     16384 x 512 vs a noisy permutation of itself: certified sparse matching (must recover the permutation)
  rand16k     16384 x 512 vs an independent random dictionary: the least structure, hardest for candidate pruning
  eq4096      sparse vs dense scipy Hungarian (the peer) at 4096, planted and random: same matching? time ratio
  max65k      max-only MCS (both directions) for two 65536 x 512 dictionaries: bounded memory
Targets from the issue: 16k matching <= 60 s and <= 3 GiB peak on 2 cores. The machine may be shared: the load
average is printed next to the timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

D = 512


def peak_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB -> GiB
    return float("nan")


def dictionaries(n, kind, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, D, generator=g)
    A = A / A.norm(dim=1, keepdim=True)
    if kind == "perm":
        perm = torch.randperm(n, generator=g)
        B = A[perm] + (0.3 / D**0.5) * torch.randn(n, D, generator=g)  # cos with the original ~0.96
        return A, B, torch.argsort(perm)
    B = torch.randn(n, D, generator=g)
    return A, B, None


def case(name: str) -> dict:
    import torch

    from sparse_coding.analyses import hungarian_match, mcs

    out = {"case": name, "threads": torch.get_num_threads()}
    if name in ("perm16k", "rand16k"):
        A, B, inv = dictionaries(16384, name[:4])
        t0 = time.perf_counter()
        m = hungarian_match(A, B, method="sparse")
        out["seconds"] = time.perf_counter() - t0
        out["certified"] = bool(m.info["certified"])
        out["rounds"] = m.info["rounds"]
        out["phase_seconds"] = {k: round(v, 2) for k, v in m.info["seconds"].items()}
        out["mean_matched_cos"] = float(m.cos.mean())
        if inv is not None:
            out["permutation_recovered"] = bool(torch.equal(m.cols, inv))
    elif name == "eq4096":
        for kind in ("perm", "rand"):
            A, B, _ = dictionaries(4096, kind, seed=1)
            t0 = time.perf_counter()
            dn = hungarian_match(A, B, method="dense")
            td = time.perf_counter() - t0
            t0 = time.perf_counter()
            sp = hungarian_match(A, B, method="sparse")
            ts = time.perf_counter() - t0
            out[kind] = {"dense_seconds": td, "sparse_seconds": ts, "same_matching": bool(torch.equal(dn.cols, sp.cols)),
                         "total_diff": abs(dn.total - sp.total), "certified": bool(sp.info["certified"])}
    elif name == "max65k":
        A, B, _ = dictionaries(65536, "rand")
        t0 = time.perf_counter()
        r = mcs(A, B)
        out["seconds"] = time.perf_counter() - t0
        out["mmcs"] = r.mmcs
    else:
        raise ValueError(f"unknown case {name!r}")
    out["peak_gib"] = peak_gib()
    return out


def run_case(name: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--case", name], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"case {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from sparse_coding.files import update_json
    from sparse_coding.paths import repo_root

    load = os.getloadavg()[0]
    res = {n: run_case(n) for n in ("perm16k", "rand16k", "eq4096", "max65k")}
    p, r, e, x = res["perm16k"], res["rand16k"], res["eq4096"], res["max65k"]
    print(f"load average at start: {load:.1f} on {os.cpu_count()} cores (torch threads {p['threads']})")
    print(f"{'case':<34}{'seconds':>9}{'peak GiB':>10}  notes")
    print(f"{'16384 noisy permutation, 1:1':<34}{p['seconds']:>9.1f}{p['peak_gib']:>10.2f}  certified={p['certified']} "
          f"permutation recovered={p['permutation_recovered']} phases={p['phase_seconds']}")
    print(f"{'16384 random vs random, 1:1':<34}{r['seconds']:>9.1f}{r['peak_gib']:>10.2f}  certified={r['certified']} "
          f"rounds={r['rounds']} phases={r['phase_seconds']}")
    for kind in ("perm", "rand"):
        k = e[kind]
        print(f"{'4096 ' + kind + ': dense scipy Hungarian':<34}{k['dense_seconds']:>9.1f}")
        print(f"{'4096 ' + kind + ': sparse certified':<34}{k['sparse_seconds']:>9.1f}{'':>10}  same matching as dense="
              f"{k['same_matching']} |total diff|={k['total_diff']:.2e}")
    print(f"{'65536 max-only MCS (both ways)':<34}{x['seconds']:>9.1f}{x['peak_gib']:>10.2f}  mmcs={x['mmcs']:.4f}")
    update_json(repo_root() / "benchmarks/results.json", {
        "mcs16k_seconds": max(p["seconds"], r["seconds"]),
        "mcs16k_peak_gib": max(p["peak_gib"], r["peak_gib"]),
        "mcs16k_perm_seconds": p["seconds"],
        "mcs16k_random_seconds": r["seconds"],
        "mcs16k_permutation_recovered": p["permutation_recovered"],
        "mcs4096_equal_dense": e["perm"]["same_matching"] and e["rand"]["same_matching"],
        "mcs4096_dense_over_sparse_perm": e["perm"]["dense_seconds"] / e["perm"]["sparse_seconds"],
        "mcs4096_dense_over_sparse_random": e["rand"]["dense_seconds"] / e["rand"]["sparse_seconds"],
        "mcs65k_maxonly_seconds": x["seconds"],
        "mcs65k_maxonly_peak_gib": x["peak_gib"],
        "mcs_bench_load_average": load,
    })


if __name__ == "__main__":
    if "--case" in sys.argv:
        print(json.dumps(case(sys.argv[sys.argv.index("--case") + 1])))
    else:
        main()
