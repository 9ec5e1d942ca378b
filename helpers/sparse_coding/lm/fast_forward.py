"""A lean forward pass of GPT-NeoX (Pythia's family) for harvesting, and the CPU batch workers that run it.

`activations.harvest` uses `NeoXFastPath` for block-level hooks of a GPT-NeoX model loaded with `lm.load_model` (any
other model or hook goes through the TransformerLens bridge's own hook points) and, on a CPU with more than one
torch thread, runs whole batches side by side on `CPUWorkers`. Both give the bridge's values (tests/lm and
tests/activations check it)."""

from __future__ import annotations

import collections
import threading
from typing import Callable, Sequence

import torch

from ..arguments import checked
from .hooks import check_token_ids, parse_hook
from .load import loaded


@checked
class NeoXFastPath:
    """A lean forward for GPT-NeoX (Pythia's family) that computes exactly what the requested hooks need.

    TransformerLens's bridge runs the transformers modules with ~40 hook points per block, eager attention (it must
    materialise the pattern for ``hook_pattern``) and a fresh causal mask per call. Harvesting needs none of that:
    this path reads the same weight tensors (recorded by `lm.load_model`, see `lm.loaded`) and runs embed -> blocks
    up to the last needed layer with fused scaled-dot-product attention (``is_causal``) and cached rotary tables
    applied to q and k in one pass. It covers the block-level hooks in SUPPORTED; anything else goes through the
    bridge's own hook points (``activations.harvest``)."""

    SUPPORTED = {"hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "mlp.hook_post", "mlp.hook_pre"}

    @classmethod
    def applies(cls, model, hooks: Sequence[str]) -> bool:
        rec = loaded(model)
        if rec is None or rec.rotary is None:
            return False
        cfg = rec.hf_config
        if getattr(cfg, "model_type", None) != "gpt_neox" or getattr(cfg, "hidden_act", "") != "gelu":
            return False
        parsed = [parse_hook(h) for h in hooks]
        return all(p.layer is not None and p.site in cls.SUPPORTED for p in parsed)

    def __init__(self, model: torch.nn.Module, hooks: Sequence[str]):
        rec = loaded(model)
        self.cfg = rec.hf_config
        self.p = rec.weights
        self.hooks = list(hooks)
        self.by_layer: dict[int, list[tuple[str, str]]] = {}
        for h in self.hooks:
            layer, site = parse_hook(h)
            self.by_layer.setdefault(layer, []).append((site, h))
        self.last = max(self.by_layer)
        self.n_heads = self.cfg.num_attention_heads
        self.head = self.cfg.hidden_size // self.n_heads
        self.eps = self.cfg.layer_norm_eps
        self.rotary = rec.rotary
        self._tables: dict = {}
        self._folded: dict = {}
        self._lock = threading.Lock()  # harvest may run batches on several threads

    def _layer(self, L: int) -> dict[str, torch.Tensor]:
        """Layer L's weights rearranged for this path (made once): the layer norms' scale and shift folded into the
        matmuls that read them (W diag(γ), b + W β), so each norm is one plain normalisation, shared by attention
        and MLP under Pythia's parallel residual; and query_key_value split into a q|k part and a v part (rows
        regrouped per head), so q and k leave their matmul as one contiguous block for the rotary step."""
        with self._lock:
            if L not in self._folded:
                p, pre = self.p, f"gpt_neox.layers.{L}."
                H, hd = self.n_heads, self.head

                def fold(w, b, norm):
                    g, beta = p[pre + norm + ".weight"].detach(), p[pre + norm + ".bias"].detach()
                    w = w.detach()
                    return w * g, b.detach() + w @ beta

                w, bias = fold(p[pre + "attention.query_key_value.weight"], p[pre + "attention.query_key_value.bias"],
                               "input_layernorm")
                w, bias = w.view(H, 3, hd, -1), bias.view(H, 3, hd)
                w_in, b_in = fold(p[pre + "mlp.dense_h_to_4h.weight"], p[pre + "mlp.dense_h_to_4h.bias"],
                                  "post_attention_layernorm")
                self._folded[L] = {
                    "qk_w": w[:, :2].reshape(H * 2 * hd, -1).contiguous(), "qk_b": bias[:, :2].reshape(-1).contiguous(),
                    "v_w": w[:, 2].reshape(H * hd, -1).contiguous(), "v_b": bias[:, 2].reshape(-1).contiguous(),
                    "in_w": w_in.contiguous(), "in_b": b_in.contiguous()}
        return self._folded[L]

    def _rotation(self, T: int, ref: torch.Tensor):
        """Rotary embedding as full-head-width tables: q' = q * cos + (q @ R) * sin, where R (head x head) is
        rotate_half on the first `r` dims (Pythia rotates a quarter of each head) and zero elsewhere, cos is 1 and
        sin 0 past r. One small matmul on the contiguous q|k block instead of slicing 8-wide strips out of it."""
        key = (T, ref.device, ref.dtype)
        with self._lock:
            if key not in self._tables:
                self._tables[key] = self._make_tables(T, ref)
        return self._tables[key]

    def _make_tables(self, T: int, ref: torch.Tensor):
        # The model's own rotary module gives cos, sin [1, T, r] (r: the rotary dims, Pythia a quarter of a head).
        cos, sin = self.rotary(ref[:1, :T], torch.arange(T, device=ref.device)[None])
        cos, sin = cos.to(ref.dtype), sin.to(ref.dtype)
        r, hd = cos.shape[-1], self.head
        cos_f = torch.ones(T, hd, device=ref.device, dtype=ref.dtype)
        sin_f = torch.zeros(T, hd, device=ref.device, dtype=ref.dtype)
        cos_f[:, :r], sin_f[:, :r] = cos[0], sin[0]
        R = torch.zeros(hd, hd, device=ref.device, dtype=ref.dtype)
        half = r // 2
        idx = torch.arange(half, device=ref.device)
        R[idx + half, idx] = -1.0  # (q @ R)[i] = -q[i + half] for i < half
        R[idx, idx + half] = 1.0   # (q @ R)[i] = q[i - half] for half <= i < r
        # [T, 1, 1, hd] broadcasts over (batch, time, head, q|k, dim) of the qkv view
        return cos_f[:, None, None], sin_f[:, None, None], R

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        p, F_ = self.p, torch.nn.functional
        tokens = check_token_ids(tokens, p["gpt_neox.embed_in.weight"].shape[0])
        B, T = tokens.shape
        d, H, hd = self.cfg.hidden_size, self.n_heads, self.head
        h = F_.embedding(tokens, p["gpt_neox.embed_in.weight"]).reshape(B * T, d)
        cos, sin, R = self._rotation(T, h.view(B, T, d))
        out: dict[str, torch.Tensor] = {}
        for L in range(self.last + 1):
            pre = f"gpt_neox.layers.{L}."
            want = dict(self.by_layer.get(L, []))
            if "hook_resid_pre" in want:
                out[want["hook_resid_pre"]] = h
            w = self._layer(L)
            x_hat = F_.layer_norm(h, (d,), None, None, self.eps)  # γ and β live in the weights (see _layer)
            qk = _linear(x_hat, w["qk_w"], w["qk_b"]).view(B, T, H, 2, hd)  # q and k of every head, rotated together
            rot = torch.mm(qk.view(-1, hd), R).view(qk.shape)
            qk.mul_(cos).addcmul_(rot, sin)
            q, k = qk[:, :, :, 0].transpose(1, 2), qk[:, :, :, 1].transpose(1, 2)
            v = _linear(x_hat, w["v_w"], w["v_b"]).view(B, T, H, hd).transpose(1, 2)
            z = F_.scaled_dot_product_attention(q, k, v, is_causal=True)
            attn = _linear(z.transpose(1, 2).reshape(B * T, d), p[pre + "attention.dense.weight"],
                           p[pre + "attention.dense.bias"])
            if not self.cfg.use_parallel_residual:
                mid = h + attn
                x_hat = F_.layer_norm(mid, (d,), None, None, self.eps)
            if "mlp.hook_pre" in want:
                pre_act = _linear(x_hat, w["in_w"], w["in_b"])
                post_act = F_.gelu(pre_act)
            else:
                pre_act, post_act = None, _linear(x_hat, w["in_w"], w["in_b"], gelu=True)
            mlp = _linear(post_act, p[pre + "mlp.dense_4h_to_h.weight"], p[pre + "mlp.dense_4h_to_h.bias"])
            # In place into mlp (a fresh tensor) unless the MLP's own output is wanted.
            total = mlp.clone() if "hook_mlp_out" in want else mlp
            h = total.add_(attn).add_(h) if self.cfg.use_parallel_residual else total.add_(mid)
            for kind, name in want.items():
                out[name] = {"hook_resid_post": h, "hook_attn_out": attn, "hook_mlp_out": mlp,
                             "mlp.hook_post": post_act, "mlp.hook_pre": pre_act}.get(kind, out.get(name))
        return {name: a.view(B, T, -1) for name, a in out.items()}


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """x @ w.T + b, then exact GELU if asked."""
    y = torch.nn.functional.linear(x, w, b)
    return torch.nn.functional.gelu(y) if gelu else y


@checked
class CPUWorkers:
    """Whole batches on separate threads with one intra-op thread each, results in order.

    On a few CPU cores a small model's forward is mostly ops too small to split well: two single-threaded forwards
    side by side (torch releases the GIL inside its ops) beat one forward on two intra-op threads on the 2-core
    machine this project targets (benchmarks/bench_harvest.py measures it). Used for the lean NeoX path only (the
    bridge's hooks keep state per pass). Restores the thread count on close; with one thread there is nothing to gain and it stays serial."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.n = torch.get_num_threads()
        self.pool = None
        if self.n > 1:
            from concurrent.futures import ThreadPoolExecutor

            torch.set_num_threads(1)
            self.pool = ThreadPoolExecutor(self.n, thread_name_prefix="harvest")

    #: Rows per single-threaded forward, small enough that a pass's activations stay in cache.
    ROWS_PER_CALL = 1024

    def contexts_per_call(self, batch_size: int, ctx_len: int) -> int:
        return max(1, min(batch_size, self.ROWS_PER_CALL // ctx_len))

    def __bool__(self) -> bool:
        return self.pool is not None

    def map(self, inputs):
        """fn over inputs, at most 2 x threads in flight (bounded memory), yielded in input order."""
        pending: collections.deque = collections.deque()
        for x in inputs:
            pending.append(self.pool.submit(self.fn, x))
            if len(pending) >= 2 * self.n:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(self.n)
            self.pool = None
