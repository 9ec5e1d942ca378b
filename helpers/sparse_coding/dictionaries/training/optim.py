"""The SAE's optimizer: torch's Adam, fused where the device supports it, stepping every parameter through a row-major
view of it; and Adam's state as named tensors for the saved training state.

Why the views: W_enc [E, d_in, d_sae] is stored column-major (it starts as a clone of W_decᵀ, and TopK's sparse
encoder gradient comes out as rows of W_encᵀ in the same layout). torch's fused Adam kernel copies every gradient
that is not row-major into a contiguous temporary on each step, which the kernel then does not read: a transposed
copy of the whole gradient (benchmarks/bench_train.py's Floor counts it). So the optimizer holds, for such a
parameter, a row-major alias of the same storage (its transpose over the last two axes) and hands it the transposed
gradient before each step: the same elementwise update on the same memory, without the copy. The module's parameters
are updated in place as before; `param_state(opt, param)` gives the moments of a module parameter in its own shape.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..base import EnsembleSAE


def _needs_alias(p: torch.Tensor) -> bool:
    return p.dim() >= 2 and not p.is_contiguous() and p.mT.is_contiguous()


class SAEAdam(torch.optim.Adam):
    """torch.optim.Adam over `params`, where each column-major parameter (last two axes) is stepped through its
    row-major alias (see the module docstring). `zero_grad` clears the module parameters' gradients too. Raises
    what torch.optim.Adam raises (e.g. ValueError for fused=True on a device without a fused kernel)."""

    def __init__(self, params, **kwargs: Any):
        self.aliases: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id(module param) -> (param, alias)
        params = list(params)
        if params and isinstance(params[0], dict):  # param groups
            params = [{**g, "params": [self._alias(p) for p in g["params"]]} for g in params]
        else:
            params = [self._alias(p) for p in params]
        super().__init__(params, **kwargs)

    def _alias(self, p: torch.Tensor) -> torch.Tensor:
        if not _needs_alias(p):
            return p
        alias = nn.Parameter(p.detach().mT, requires_grad=p.requires_grad)  # shares p's storage
        self.aliases[id(p)] = (p, alias)
        return alias

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p, alias in self.aliases.values():
            # The fused kernel pairs param and gradient memory element by element, so the gradient must have the
            # alias's (row-major) layout: autograd gives the parameter's layout, a hand-set one may differ.
            alias.grad = None if p.grad is None else p.grad.mT.contiguous()
        super().step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for p, _ in self.aliases.values():
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def stepped(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor this optimizer steps for module parameter p: p itself, or its row-major alias."""
        return self.aliases[id(p)][1] if id(p) in self.aliases else p


def adam(sae: EnsembleSAE, lr: float, betas: tuple[float, float]) -> SAEAdam:
    """Adam over the SAE's parameters, fused into one kernel per step where the device supports it (CPU and CUDA
    do): on small SAEs the per-parameter-tensor launches of the default implementation are a visible share of a
    step. Still elementwise, so ensemble members stay independent."""
    try:
        return SAEAdam(sae.parameters(), lr=lr, betas=betas, fused=True)
    except (RuntimeError, ValueError):
        return SAEAdam(sae.parameters(), lr=lr, betas=betas)


def _stepped(opt: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor:
    """The tensor `opt` steps for module parameter p (its alias under SAEAdam, else p)."""
    return opt.stepped(p) if isinstance(opt, SAEAdam) else p


def param_state(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, Any]:
    """Optimizer state of module parameter p (any torch optimizer), with tensors of p's shape (views: writing to
    them writes the optimizer's state); {} before the first step."""
    target = _stepped(opt, p)
    state = opt.state.get(target, {})
    if target is p:
        return state
    return {k: (v.mT if isinstance(v, torch.Tensor) and v.shape == target.shape else v) for k, v in state.items()}


def optimizer_tensors(opt: torch.optim.Optimizer, sae: EnsembleSAE) -> tuple[dict[str, torch.Tensor], list]:
    """(Adam's state as named tensors "adam.<param>.<moment>", each in its parameter's shape; its param groups as
    JSON-able dicts)."""
    tensors = {f"adam.{name}.{key}": v for name, p in sae.named_parameters()
               for key, v in param_state(opt, p).items() if isinstance(v, torch.Tensor)}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              for g in opt.param_groups]
    return tensors, groups


def load_optimizer(opt: torch.optim.Optimizer, sae: EnsembleSAE, tensors: dict[str, torch.Tensor],
                   groups: list) -> None:
    """Inverse of `optimizer_tensors`."""
    params = dict(sae.named_parameters())
    index = {id(p): i for i, p in enumerate(q for g in opt.param_groups for q in g["params"])}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, v in tensors.items():
        if name.startswith("adam."):
            pname, key = name[len("adam."):].rsplit(".", 1)
            p = params[pname]
            target = _stepped(opt, p)
            if target is not p and v.shape == p.shape:
                v = v.mT
            state.setdefault(index[id(target)], {})[key] = v
    sd = opt.state_dict()
    for g, saved in zip(sd["param_groups"], groups):
        g.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items()})
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    # Give each moment its stepped tensor's memory layout, as a fresh Adam does (zeros_like): safetensors hands back
    # contiguous tensors, and the fused kernel pairs param and moment memory element by element.
    for p, st in opt.state.items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                st[key] = torch.empty_like(p, dtype=v.dtype).copy_(v)
