"""End-to-end training (Braun, Taylor, Goldowsky-Dill, Sharkey 2024, arXiv 2405.12241; ApolloResearch/e2e_sae):
the batch source and loss of `train_sae` when `TrainSettings.loss` is "e2e" or "e2e+ds".

Each step takes token contexts, runs the model clean (no grad) to read the activation at the hook (the SAE's input,
as a local SAE sees it), the clean output distribution and, for "e2e+ds", the activations at every later layer;
then runs it again with every member's reconstruction spliced in at the hook (members side by side in the batch,
one forward pass), with gradients flowing through the layers above the hook into the SAE only: the model's
parameters are frozen for the step (requires_grad off, restored after) and never change.

Loss per member, in the units of a local SAE's loss (the paper's loss times d_in, so a kind's sparsity coefficient
means what it means locally: the paper divides its L1 by d_in instead):
    d_in · kl_coef · KL(clean ‖ spliced)                    nats per kept position, mean over positions
  + d_in · downstream_coef · mean over later layers of the per-dimension MSE of (spliced − clean) · input_scale
  + the kind's own terms (L1, AuxK, L0 penalty).
Positions an `Exclusion` leaves out keep their clean activation and are left out of every term."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import numpy as np
import torch

from ... import lm
from ...arguments import checked
from ...lm.upper import UpperLayers
from ...activations import Exclusion

DEFAULT_BATCH_TOKENS = 4096
# The later layers whose activations "e2e+ds" keeps close: the residual stream after each block above the hook.
DOWNSTREAM_SITE = "resid_post"


@checked
def downstream_hooks(model: torch.nn.Module, hook_name: str) -> list[str]:
    """The residual stream after every block downstream of `hook_name` (``blocks.L.hook_resid_post`` -> blocks
    L+1..n-1; a resid_pre or mid-block hook of block L -> blocks L..n-1), the final block's output included (the
    authors' configs take the later blocks' inputs, resid_pre, which leaves it out: on a 4-block model at layer 2
    that would leave nothing). Empty for the last block's output.
    Raises ValueError for a hook outside the blocks (embeddings, final norm)."""
    layer, site = lm.parse_hook(hook_name)
    if layer is None:
        raise ValueError(f"hook {hook_name!r} is not in a block; end-to-end training splices into a block's "
                         f"activation, e.g. blocks.0.hook_resid_post")
    start = layer + 1 if site == "hook_resid_post" else layer
    return [lm.hook_name(DOWNSTREAM_SITE, i) for i in range(start, lm.n_layers(model))]


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode with no parameter requiring grad, both restored on exit: gradients of a spliced pass
    reach the SAE and never the model."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)


def check_contexts(model: torch.nn.Module, tokens: Any) -> torch.Tensor:
    """`tokens` as a LongTensor [n_contexts, ctx_len] of ids the model takes, or ValueError naming what is wrong."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.is_floating_point() \
            or tokens.dtype == torch.bool:
        got = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"end-to-end training takes token contexts: batches must be an integer tensor "
                         f"[n_contexts, ctx_len] (e.g. lm.model_contexts(...)), got {got}; activations train only "
                         f"with loss='local'")
    if tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise ValueError(f"batches {tuple(tokens.shape)}: need at least one context of at least 2 tokens")
    cfg = getattr(model, "cfg", None)
    d_vocab, n_ctx = getattr(cfg, "d_vocab", None), getattr(cfg, "n_ctx", None)
    if d_vocab is not None and (int(tokens.min()) < 0 or int(tokens.max()) >= int(d_vocab)):
        raise ValueError(f"token ids must lie in [0, {d_vocab}) for this model, got [{int(tokens.min())}, "
                         f"{int(tokens.max())}]; were they made by another tokenizer?")
    if n_ctx is not None and tokens.shape[1] > int(n_ctx):
        raise ValueError(f"contexts of {tokens.shape[1]} tokens exceed the model's n_ctx={n_ctx}")
    return tokens.long()


class KLFromLogits(torch.autograd.Function):
    """KL(p ‖ softmax(z)) over the last axis from the spliced logits z [E, ..., V], the clean probabilities p
    [..., V] and their Σ p log p [...]: Σ p log p + logsumexp(z) − Σ p z (Σ p = 1), so neither log-softmax nor a
    product is kept over the vocabulary; the backward, softmax(z) − p, is written in place in one buffer (autograd's
    takes ~4x as long, most of an e2e step on a small model with a large vocabulary)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, p: torch.Tensor, neg_entropy: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(z, -1)
        dot = torch.einsum("e...v,...v->e...", z, p)
        ctx.save_for_backward(z, p, lse)
        return neg_entropy + lse - dot

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        z, p, lse = ctx.saved_tensors
        grad = z - lse.unsqueeze(-1)
        grad.exp_().sub_(p).mul_(g.unsqueeze(-1))
        return grad, None, None


def kl_clean_spliced(logp_clean: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(clean ‖ spliced) in nats at every position: log-probs [..., vocab] -> [...]."""
    return (logp_clean.exp() * (logp_clean - logp)).sum(-1)


class SplicedObjective:
    """`train_sae`'s batch source and extra loss for an e2e mode. `objective(step)` -> the activations [rows, d_in]
    at the hook of that step's contexts (a pure function of the step: contexts drawn epoch after epoch in the order
    `activations.row_order(n_contexts, seed, epoch)`, so a resumed run sees the same); `terms(x_hat, input_scale)`
    -> {"kl": [E], "downstream_mse": [E]} for the reconstructions x_hat [E, rows, d_in] of that batch.

    batch_size: tokens per step, rounded down to whole contexts (at least one context); None: 4096 tokens, or every
    context when there are fewer."""

    def __init__(self, model: torch.nn.Module, hook_name: str, tokens: torch.Tensor, batch_size: int | None,
                 seed: int, loss: str, exclude: Exclusion | None = None):
        lm.check_hooks(model, [hook_name])
        self.model, self.hook_name, self.seed, self.mode = model, hook_name, int(seed), loss
        self.tokens = check_contexts(model, tokens)
        n, T = self.tokens.shape
        if batch_size is None:  # as for a dataset tensor: 4096 tokens, or all there are
            batch_size = min(DEFAULT_BATCH_TOKENS, n * T)
        if batch_size < T:
            raise ValueError(f"batch_size={batch_size} tokens is less than one context of {T} tokens; give at least "
                             f"{T}")
        self.per_step = batch_size // T
        if self.per_step > n:
            raise ValueError(f"batch_size={batch_size} tokens needs {self.per_step} contexts per step but batches "
                             f"has {n}; lower batch_size or pass more contexts")
        self.per_epoch = n // self.per_step
        self.exclude = exclude or Exclusion()
        self.later = downstream_hooks(model, hook_name) if loss == "e2e+ds" else []
        if loss == "e2e+ds" and not self.later:
            raise ValueError(f"loss='e2e+ds' needs layers after {hook_name!r} and this model has none; use "
                             f"loss='e2e' at the last layer")
        self.device = next(iter(model.parameters())).device
        # The layers above the hook alone (`lm.upper`, checked against the full pass once per batch size).
        self.upper = UpperLayers.for_hook(model, hook_name)
        self.later_layers = [lm.parse_hook(h).layer for h in self.later]
        self._perm_epoch, self._perm = -1, np.arange(0)
        self._clean: dict[str, Any] = {}

    def key(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues, beside the settings."""
        return {"hook": self.hook_name, "contexts": list(self.tokens.shape), "later": self.later,
                "exclude": self.exclude.to_json(),
                "tokens_sum": int(self.tokens.sum()), "tokens_first": self.tokens[0, :8].tolist()}

    def contexts(self, step: int) -> torch.Tensor:
        from ...activations import row_order

        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._perm_epoch:
            self._perm, self._perm_epoch = row_order(len(self.tokens), self.seed, epoch), epoch
        rows = torch.from_numpy(self._perm[i * self.per_step:(i + 1) * self.per_step].copy())
        return self.tokens[rows].to(self.device)

    @torch.no_grad()
    def __call__(self, step: int) -> torch.Tensor:
        tokens = self.contexts(step)
        seen: dict[str, torch.Tensor] = {}

        def grab(name: str):  # by the name asked for: a bridge's hook may carry another (its alias's target)
            def hook_fn(act, hook):
                seen[name] = act.detach().clone()
            return hook_fn

        with frozen(self.model), (self.upper.recording(tokens) if self.upper else nullcontext()):
            logits = self.model.run_with_hooks(tokens, return_type="logits",
                                               fwd_hooks=[(h, grab(h)) for h in [self.hook_name, *self.later]])
        act = seen[self.hook_name]
        if self.upper is not None:
            with frozen(self.model):
                self.upper.check(act, logits, self.later_layers, [seen[h] for h in self.later])
        keep = self.exclude.keep(tokens, act, self.hook_name)
        if not bool(keep.any()):
            raise ValueError(f"exclude={self.exclude} leaves no position of step {step}'s contexts to train on")
        logp = logits.float().log_softmax(-1)
        probs = logp.exp()
        self._clean = {"step": step, "tokens": tokens, "act": act, "keep": keep, "probs": probs,
                       "neg_entropy": (probs * logp).sum(-1), "later": [seen[h] for h in self.later]}
        return act[keep]

    def terms(self, x_hat: torch.Tensor, input_scale: float) -> dict[str, torch.Tensor]:
        """The e2e terms of the batch last returned, for reconstructions x_hat [E, rows, d_in] in raw units:
        "kl" [E] (nats, mean over kept positions) and, for "e2e+ds", "downstream_mse" [E] (per dimension, in the
        SAE's input units, mean over kept positions and later layers). Differentiable in x_hat only."""
        c = self._clean
        if not c:
            raise RuntimeError("terms() before any batch: call the objective with a step first")
        E = x_hat.shape[0]
        act, keep, tokens = c["act"], c["keep"], c["tokens"]
        spliced = act.unsqueeze(0).expand(E, *act.shape).clone()
        spliced[:, keep] = x_hat.to(act.dtype)
        spliced = spliced.reshape(E * act.shape[0], *act.shape[1:])
        later: dict[str, torch.Tensor] = {}

        def put(orig, hook):
            return spliced

        def grab(name: str):
            def hook_fn(act_, hook):
                later[name] = act_
            return hook_fn

        with frozen(self.model):
            if self.upper is not None and self.upper.ready(tokens):  # one member at a time: the recorded masks
                runs = [self.upper.run(spliced[m * len(tokens):(m + 1) * len(tokens)], self.later_layers)
                        for m in range(E)]  # and rotary tables are for this batch of contexts
                logits = torch.cat([r[0] for r in runs])
                later = {h: torch.cat([r[1][i] for r in runs]) for i, h in enumerate(self.later)}
            else:
                logits = self.model.run_with_hooks(tokens.repeat(E, 1), return_type="logits",
                                                   fwd_hooks=[(self.hook_name, put),
                                                              *[(h, grab(h)) for h in self.later]])
        n_kept = keep.sum()
        z = logits.float().reshape(E, *c["probs"].shape)
        kl = KLFromLogits.apply(z, c["probs"], c["neg_entropy"])
        out = {"kl": (kl * keep).sum((1, 2)) / n_kept}
        if self.later:
            mse = []
            for h, clean in zip(self.later, c["later"]):
                diff = (later[h].reshape(E, *clean.shape) - clean.unsqueeze(0)).float() * float(input_scale)
                mse.append((diff.pow(2).mean(-1) * keep).sum((1, 2)) / n_kept)
            out["downstream_mse"] = torch.stack(mse).mean(0)
        return out

    def loss(self, out: Any, sae: Any, kl_coef: float, downstream_coef: float) -> tuple[torch.Tensor, dict]:
        """(loss [E], its e2e terms unweighted) for an SAEOutput `out` of this batch: the kind's own terms (no local
        MSE) plus d_in · (kl_coef · KL + downstream_coef · downstream MSE)."""
        terms = self.terms(out.x_hat, sae.input_scale)
        d = float(sae.d_in)
        loss = d * kl_coef * terms["kl"]
        if "downstream_mse" in terms:
            loss = loss + d * downstream_coef * terms["downstream_mse"]
        for v in out.losses.values():
            loss = loss + v
        return loss, terms
