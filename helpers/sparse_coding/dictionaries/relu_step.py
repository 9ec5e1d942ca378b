"""A ReLU SAE's training step by hand (kinds.relu): its forward and backward as a few batched matmuls and as few
passes over the [E, B, d_sae] codes as the maths allows (tested against plain autograd).

Where the time of the toy ensemble's step went beyond its matmuls (benchmarks/bench_ensemble.py (b), 16 members,
d 256, d_sae 1024, batch 1024), and what replaces it:
- fresh [E, B, d_sae] tensors page-fault on every step: the codes and their gradient live in buffers kept from
  step to step (`buffers`);
- a bias broadcast into the output of a matmul is a copy pass plus a matmul that reads its output: the encoder's
  bias (and the L1 gradient in the backward) enters the matmul as one more input column instead ([x, 1]·[W; b]);
- sums over the batch axis (per-latent code sums, the bias gradient) are strided reductions: a matmul with a row of
  ones reads the codes once at full speed;
- the pre-bias as x − b_dec (one pass over the small [E, B, d_in] input) instead of b_enc − b_dec·W_enc: the
  encoder gradient is then one matmul, where the other form adds an [E, d_in, d_sae] outer product to it.
"""

from __future__ import annotations

import torch


def _threshold_backward():
    try:
        return torch.ops.aten.threshold_backward.grad_input
    except (AttributeError, RuntimeError):
        return None


# ATen's ReLU-backward operator (part of the documented Core ATen opset): one pass, no mask tensor. Written as
# masked_fill_(codes <= 0, 0) it builds a bool mask, several times slower at the toy ensemble's shape (what
# benchmarks/bench_ensemble.py times); the fallback, for a build without the operator, is the fastest public form.
_THRESHOLD_BACKWARD = _threshold_backward()


def relu_grad_(grad: torch.Tensor, codes: torch.Tensor, use_aten: bool = True) -> torch.Tensor:
    """grad where codes > 0, else 0, in place (the ReLU backward). grad, codes: same shape, codes = ReLU output."""
    if use_aten and _THRESHOLD_BACKWARD is not None:
        return _THRESHOLD_BACKWARD(grad, codes, 0, grad_input=grad)
    return grad.mul_(codes.sign())


def _step_buffer(buffers: dict[str, torch.Tensor] | None, name: str, shape: tuple[int, ...], like: torch.Tensor,
                 take: bool = False) -> torch.Tensor | None:
    """buffers[name] if it has this shape and like's dtype and device, else a new one; left in buffers unless
    take (then the caller puts it back when done with it). None without buffers."""
    if buffers is None:
        return None
    buf = buffers.pop(name, None)
    if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
        buf = None  # free the old one before allocating
        buf = torch.empty(shape, dtype=like.dtype, device=like.device)
    if not take:
        buffers[name] = buf
    return buf


def _augment(t: torch.Tensor, column: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """[E, R, d] and a column [E, R] (or [E, 1], repeated) -> [E, R, d + 1] = [t, column] (into out if given)."""
    E, R, d = t.shape
    if out is None:
        out = t.new_empty(E, R, d + 1)
    out[..., :d] = t
    out[..., d] = column
    return out


def _col_sums(t: torch.Tensor) -> torch.Tensor:
    """[E, B, n] -> [E, n]: sums over the batch axis, as a matmul with a row of ones."""
    return torch.bmm(t.new_ones(t.shape[0], 1, t.shape[1]), t).squeeze(1)


class ReLUStep(torch.autograd.Function):
    """ReLU SAE forward and backward by hand: x [E, B, d_in], W_enc [E, d_in, d_sae], b_enc [E, d_sae], W_dec
    [E, d_sae, d_in], b_dec [E, d_in], pre_bias (subtract b_dec from x before encoding) -> x̂ [E, B, d_in], the
    per-member mean L1 of the codes [E], the codes [E, B, d_sae] and their per-latent sums [E, d_sae] (the last two
    not differentiable: use `encode` for gradients with respect to codes).

    buffers: a dict the caller keeps from step to step (None: fresh tensors), holding the [E, B, d_sae] codes and
    code gradient and the augmented inputs between steps (see the module docstring). The forward takes the codes
    buffer out of the dict and the backward puts it back once done with it, so the codes of a graph not yet
    backpropagated (two forwards, one backward) are never overwritten, and a graph dropped unused takes its buffer
    with it. The caller must not keep the returned codes past the next step (kinds.relu hands out a checked copy)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, pre_bias, buffers=None):
        E, B, d = x.shape
        n = W_enc.shape[-1]
        # [x − b_dec, 1] (taken out of the buffers until the backward is done with it, as the codes)
        xa = _step_buffer(buffers, "x_aug", (E, B, d + 1), x, take=True)
        xa = x.new_empty(E, B, d + 1) if xa is None else xa
        if pre_bias:
            torch.sub(x, b_dec.unsqueeze(1), out=xa[..., :d])
        else:
            xa[..., :d] = x
        xa[..., d] = 1
        # [W_enc; b_enc] as rows of its transpose (W_enc's own column-major layout): one copy of the weights
        Wa = _augment(W_enc.mT, b_enc, _step_buffer(buffers, "W_aug", (E, n, d + 1), x)).mT
        codes = torch.bmm(xa, Wa, out=_step_buffer(buffers, "codes", (E, B, n), x, take=True)).clamp_min_(0)
        # x̂ stays fresh: callers keep it (a differentiable output), and it is only d_in/d_sae of the codes' size.
        x_hat = torch.baddbmm(b_dec.unsqueeze(1), codes, W_dec)
        # One pass over the codes gives both the L1 norm (codes >= 0) and which latents fired.
        per_latent = _col_sums(codes)
        l1 = per_latent.sum(-1) / B
        ctx.save_for_backward(xa, W_enc, W_dec, codes)
        ctx.pre_bias, ctx.buffers = pre_bias, buffers
        ctx.mark_non_differentiable(codes, per_latent)
        ctx.set_materialize_grads(False)
        return x_hat, l1, codes, per_latent

    @staticmethod
    def backward(ctx, g_xhat, g_l1, _g_codes, _g_per_latent):
        xa, W_enc, W_dec, codes = ctx.saved_tensors
        E, B, n = codes.shape
        d = W_dec.shape[-1]
        buffers = ctx.buffers
        c = (g_l1 / B).view(E, 1) if g_l1 is not None else codes.new_zeros(E, 1)
        buf = _step_buffer(buffers, "g_codes", codes.shape, codes)
        if g_xhat is None:
            g_codes = c.unsqueeze(-1).expand(E, B, n).contiguous() if buf is None else buf.copy_(c.unsqueeze(-1))
        else:
            # [g_x̂, c]·[W_dec, 1]ᵀ: the L1 gradient c enters the matmul as one more input column.
            ga = _augment(g_xhat, c.expand(E, B), _step_buffer(buffers, "g_aug", (E, B, d + 1), codes))
            Wd = _augment(W_dec, W_dec.new_ones(1, 1).expand(E, n),
                          _step_buffer(buffers, "W_dec_aug", (E, n, d + 1), codes))
            g_codes = torch.bmm(ga, Wd.mT, out=buf)
        g_pre = relu_grad_(g_codes, codes)  # in place: g_codes is ours
        need = ctx.needs_input_grad
        g_x = torch.bmm(g_pre, W_enc.transpose(1, 2)) if need[0] else None
        g_W_enc = g_b = None
        if need[1] or need[2] or (ctx.pre_bias and need[4]):
            # g_preᵀ·[x − b_dec, 1]: the encoder gradient (as rows of its transpose, W_enc's layout) and, in the
            # last column, the bias gradient (the pre-activations' gradient summed over the batch), in one matmul.
            g_Wa = torch.bmm(g_pre.transpose(1, 2), xa)
            g_W_enc, g_b = g_Wa[..., :d].transpose(1, 2), g_Wa[..., d]
        g_W_dec = torch.bmm(codes.transpose(1, 2), g_xhat) if g_xhat is not None and need[3] else None
        g_b_dec = None
        if need[4]:
            g_b_dec = g_xhat.sum(1) if g_xhat is not None else codes.new_zeros(E, d)
            if ctx.pre_bias:  # pre = (x − b_dec)·W_enc + b_enc
                g_b_dec = g_b_dec - torch.bmm(W_enc, g_b.unsqueeze(2)).squeeze(2)
        if buffers is not None:  # free for the next forward to overwrite
            buffers["codes"], buffers["x_aug"] = codes.detach(), xa.detach()
        return (g_x, g_W_enc if need[1] else None, g_b if need[2] else None, g_W_dec, g_b_dec, None, None)
