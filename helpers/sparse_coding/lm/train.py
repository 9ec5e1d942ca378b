"""Train the offline default model: a small GPT-NeoX (Pythia's architecture: rotary on a quarter of each head,
attention and MLP in parallel off the same residual, untied unembedding) on the standard library's source with a
byte-level BPE trained here. It is saved with ``save_pretrained`` at revisions on Pythia's schedule (``step{N}``
folders), so ``load_model(dir, "step512")`` and ``load_model("EleutherAI/pythia-70m-deduped", "step512")`` mean the
same thing.

Layout under ``<data_dir>/lm/offline/``::

    tokenizer.json  tokenizer_config.json        the BPE (also copied into every revision folder)
    tokens-train.safetensors tokens-val.safetensors  the token streams the model saw / was validated on
    step0/ step1/ step2/ step4/ ... step512/ step1000/ ...   save_pretrained + tokenizer, each loads alone
    final/                                       the last step (also its step{N} folder)
    train_log.json                               config, loss history, metrics
"""

from __future__ import annotations

import math
import shutil
import os
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..arguments import checked
from .. import corpus as _corpus
from ..files import atomic_dir, canonical, folder_lock, load_json, load_tensors, save_json, save_tensors
from ..paths import resolve
from .gguf import gguf_model_id, is_gguf
from .checkpoint import STATE_DIR, load_state, save_state

OFFLINE_SUBDIR = Path("lm") / "offline"

# ----------------------------------------------------------------------------------------------------- config

@checked
@dataclass
class LMConfig:
    """Everything that decides the offline model. Defaults: the model `make figures` trains (its time: figures/run_times.json)."""

    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    vocab_size: int = 4096
    ctx_len: int = 128
    rotary_pct: float = 0.25       # Pythia: rotary on a quarter of each head's dims
    batch_size: int = 32           # contexts per step
    steps: int = 1000
    lr: float = 3e-3
    min_lr_frac: float = 0.1       # cosine decays to lr * min_lr_frac
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_contexts: int = 256       # validation contexts used by the periodic estimate (the final one uses all)
    seed: int = 0

    def hf_config(self):
        from transformers import GPTNeoXConfig

        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        return GPTNeoXConfig(
            vocab_size=self.vocab_size, hidden_size=self.d_model, num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads, intermediate_size=self.d_mlp, max_position_embeddings=self.ctx_len,
            rotary_pct=self.rotary_pct, use_parallel_residual=True, hidden_act="gelu", tie_word_embeddings=False,
            bos_token_id=0, eos_token_id=0, initializer_range=0.02, attention_dropout=0.0, hidden_dropout=0.0)


@checked
def revision_steps(last_step: int) -> list[int]:
    """Pythia's revision schedule up to ``last_step``: 0, 1, 2, 4, ..., 512, then every 1000; plus the last step."""
    steps = [0] + [2 ** i for i in range(10) if 2 ** i <= last_step]
    steps += list(range(1000, last_step + 1, 1000))
    if last_step not in steps:
        steps.append(last_step)
    return sorted(set(steps))


@checked
def lr_at(step: int, cfg: LMConfig) -> float:
    """Linear warm-up then cosine decay to lr * min_lr_frac at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


# ----------------------------------------------------------------------------------------------------- training

def _save_revision(model, tokenizer, folder: Path, extra: dict | None = None) -> None:
    """save_pretrained + tokenizer into ``folder``, built whole under a temporary name (see files.atomic_dir)."""
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per revision buries the training bar
    try:
        with atomic_dir(folder, overwrite=True) as tmp:
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            if extra:
                save_json(tmp / "training_state.json", extra)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()


@checked
@torch.inference_mode()
def validation_loss(model: torch.nn.Module, ctxs: torch.Tensor, batch_size: int = 64, device: str | torch.device = "cpu") -> float:
    """Mean next-token cross-entropy (nats/token) of a transformers causal LM over every position of ``ctxs``
    [n_contexts, ctx_len]."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(ctxs), batch_size):
        x = ctxs[i:i + batch_size].to(device)
        logits = model(x).logits[:, :-1]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += x[:, 1:].numel()
    return total / count


@checked
def train_offline_model(data_dir: str | os.PathLike = "data", cfg: LMConfig | None = None, *,
                        source: str = "stdlib", max_train_bytes: int | None = None, val_fraction: float = 0.05,
                        stdlib_val: str = "split", device: str = "cpu",
                        n_threads: int | None = None, progress: bool = True, overwrite: bool = False,
                        state_every: int = 50) -> dict:
    """Train the offline default model into ``<data_dir>/lm/offline`` and return its ``train_log.json`` contents.

    Work already on disk with the same settings is reused (a second call returns at once) and an interrupted run
    with the same settings resumes from its last state (saved every ``state_every`` steps; the result is the
    uninterrupted run's, bit for bit). Deterministic for ``cfg.seed`` on a given machine and thread count.
    Raises FileExistsError, naming the folder and the differing settings, when the folder holds a model trained
    with other settings (or one whose settings are unknown): ``overwrite=True`` retrains from scratch, and what
    was harvested or trained from the old model is then refused as stale (its manifest records the old model's
    ``model_id``)."""
    from tqdm.auto import tqdm
    from transformers import GPTNeoXForCausalLM

    cfg = cfg or LMConfig()
    out = resolve(data_dir) / OFFLINE_SUBDIR
    log_path = out / "train_log.json"
    run_key = {"config": asdict(cfg), "source": source, "max_train_bytes": max_train_bytes,
               "val_fraction": val_fraction, "stdlib_val": stdlib_val}
    out.parent.mkdir(parents=True, exist_ok=True)
    # Locked beside the folder (an overwrite deletes the folder itself): two trainings never write it at once.
    with folder_lock(out.parent, f"train_offline_model {out}"):
        run_key = canonical(run_key)
        if log_path.exists() and not overwrite:
            log = load_json(log_path)
            if canonical(log.get("run_key")) == run_key and (out / "final" / "config.json").exists():
                if not (out / RUN_FILE).exists():  # trained before run.json existed
                    _claim_folder(out, run_key, overwrite=False, legacy_ok=True)
                return log
        _claim_folder(out, run_key, overwrite)
        if n_threads:
            torch.set_num_threads(n_threads)
        tokenizer, train_tokens, val_tokens, corpus_name = _prepare_tokens(out, cfg, source, max_train_bytes,
                                                                           val_fraction, stdlib_val, progress)
        train_ctx = _corpus.contexts(train_tokens, cfg.ctx_len)
        val_ctx = _corpus.contexts(val_tokens, cfg.ctx_len)
        if len(train_ctx) < cfg.batch_size:
            raise ValueError(f"only {len(train_ctx)} training contexts for batch_size={cfg.batch_size}; "
                             f"lower batch_size/ctx_len or give more text")
        unigram_H = _corpus.unigram_entropy(val_tokens[: len(val_ctx) * cfg.ctx_len], cfg.vocab_size)

        # Model. The seed fixes the init and the data order (a generator of its own, untouched by anything else).
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        hf_cfg = cfg.hf_config()
        hf_cfg.vocab_size = len(tokenizer)  # BPE may stop short of the requested vocab on tiny corpora
        model = GPTNeoXForCausalLM(hf_cfg).to(device)
        n_params = sum(p.numel() for p in model.parameters())
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
        revisions = set(revision_steps(cfg.steps))
        # Evenly spaced over the whole validation set: its first contexts are a few modules only, so a prefix is a
        # biased estimate of the final (all-contexts) loss.
        eval_ctx = val_ctx[torch.linspace(0, len(val_ctx) - 1, min(cfg.eval_contexts, len(val_ctx))).long()]
        history: dict[str, list] = {"step": [], "train_loss": [], "val_step": [], "val_loss": [], "lr": []}


        tokens_per_step = cfg.batch_size * cfg.ctx_len
        perm = torch.randperm(len(train_ctx), generator=gen)
        cursor, t_train, running, start = 0, 0.0, None, 0
        resumed = load_state(out, model, opt, gen)
        if resumed is not None:
            perm, loop = resumed
            start, cursor, history, t_train, running = (loop["step"], loop["cursor"], loop["history"], loop["t_train"],
                                                        loop["running"])
        bar = tqdm(range(start, cfg.steps + 1), desc="train", disable=not progress, unit="step", initial=start,
                   total=cfg.steps + 1)
        for step in bar:
            if step > start and step % state_every == 0:  # the state before this step's update
                save_state(out, model, opt, gen, perm, {"step": step, "cursor": cursor, "history": history,
                                                        "t_train": t_train, "running": running})
            # The state after `step` optimizer updates is Pythia's "step{step}" (step0 = the initialisation).
            if step % cfg.eval_every == 0 or step == cfg.steps:
                history["val_step"].append(step)
                history["val_loss"].append(validation_loss(model, eval_ctx, device=device))
            if step in revisions:
                _save_revision(model, tokenizer, out / f"step{step}", {"step": step, "tokens_seen": step * tokens_per_step})
            if step == cfg.steps:
                break
            model.train()
            t0 = time.perf_counter()
            if cursor + cfg.batch_size > len(perm):  # a new epoch: a fresh permutation from the same generator
                perm, cursor = torch.randperm(len(train_ctx), generator=gen), 0
            x = train_ctx[perm[cursor:cursor + cfg.batch_size]].to(device)
            cursor += cfg.batch_size
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            logits = model(x).logits[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            t_train += time.perf_counter() - t0
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            history["step"].append(step + 1)
            history["train_loss"].append(loss.item())
            history["lr"].append(lr_at(step, cfg))
            bar.set_postfix(loss=f"{running:.3f}", val=f"{history['val_loss'][-1]:.3f}", refresh=False)
        bar.close()

        final_val = validation_loss(model, val_ctx, device=device)
        final_dir = out / "final"
        _save_revision(model, tokenizer, final_dir, {"step": cfg.steps, "tokens_seen": cfg.steps * tokens_per_step})
        metrics = {
            "val_loss": final_val, "unigram_entropy": unigram_H, "loss_ratio": final_val / unigram_H,
            "n_params": n_params, "train_tokens": cfg.steps * tokens_per_step, "corpus_train_tokens": train_tokens.numel(),
            "val_tokens": val_ctx.numel(), "tokens_per_s": cfg.steps * tokens_per_step / max(t_train, 1e-9),
            "train_seconds": t_train, "n_layers": cfg.n_layers, "d_model": cfg.d_model, "vocab_size": len(tokenizer),
            "ctx_len": cfg.ctx_len, "checkpoints": [f"step{s}" for s in sorted(revisions)], "corpus": corpus_name,
        }
        log = {"run_key": run_key, "model_id": load_json(out / RUN_FILE)["model_id"], "metrics": metrics,
               "history": history}
        save_json(log_path, log)
        shutil.rmtree(out / STATE_DIR, ignore_errors=True)
        return log


RUN_FILE = "run.json"


@checked
def model_id(model: str, data_dir: str | os.PathLike = "data") -> str | None:
    """What a model's weights came from, for the manifests made from it: the offline model's training settings
    digest (None before it is trained); a GGUF model's file, quantisation and sha256 (`lm.gguf.gguf_model_id`); None
    for a hub name (its revision already names its weights)."""
    if is_gguf(model):
        return gguf_model_id(model)
    if model != "offline":
        return None
    run = resolve(data_dir) / OFFLINE_SUBDIR / RUN_FILE
    return load_json(run).get("model_id") if run.exists() else None


def _claim_folder(out: Path, run_key: dict, overwrite: bool, legacy_ok: bool = False) -> None:
    """Make `out` this run's folder: new, or holding this run's unfinished work (kept, to resume). Another run's
    folder (or one of unknown settings) is refused unless overwrite, which deletes it first."""
    if out.exists() and any(out.iterdir()):
        saved = load_json(out / RUN_FILE).get("run_key") if (out / RUN_FILE).exists() else None
        if saved is not None and canonical(saved) == run_key and not overwrite:
            return
        if legacy_ok and saved is None:  # a finished run whose train_log.json matches: record it
            model_id = hashlib.sha256(json.dumps(run_key, sort_keys=True).encode()).hexdigest()[:16]
            save_json(out / RUN_FILE, {"run_key": run_key, "model_id": model_id})
            return
        if not overwrite:
            if saved is None:
                why = f"no {RUN_FILE} records how its contents were made"
            else:
                flat_old, flat_new = _flatten(saved), _flatten(run_key)
                diff = sorted(k for k in set(flat_old) | set(flat_new) if flat_old.get(k) != flat_new.get(k))
                why = "it was trained with other settings: " + ", ".join(
                    f"{k} {flat_old.get(k)!r} -> {flat_new.get(k)!r}" for k in diff)
            raise FileExistsError(f"{out} already holds a model ({why}); pass overwrite=True to delete it and "
                                  "retrain (activations and dictionaries made from it are then refused as stale), "
                                  "or use another data_dir")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    # model_id names the settings (training is deterministic for them): manifests downstream record it, so a
    # model retrained with other settings makes them stale.
    model_id = hashlib.sha256(json.dumps(run_key, sort_keys=True).encode()).hexdigest()[:16]
    save_json(out / RUN_FILE, {"run_key": run_key, "model_id": model_id})


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _prepare_tokens(out: Path, cfg: LMConfig, source: str, max_train_bytes, val_fraction, stdlib_val,
                    progress: bool):
    """Corpus -> tokenizer -> token streams (the tokenizer is trained on training documents only), or what a
    previous attempt of this run already saved."""

    if (out / "corpus.json").exists() and (out / "tokens-val.safetensors").exists():
        # Built as train_tokenizer builds it (not from_pretrained, which adds loading keys to the config the
        # revisions save): a resumed run writes the same files as an uninterrupted one.
        tokenizer = _corpus.load_trained_tokenizer(out)
        return (tokenizer, load_tensors(out / "tokens-train.safetensors")["tokens"],
                load_tensors(out / "tokens-val.safetensors")["tokens"], load_json(out / "corpus.json")["name"])
    corp = _corpus.load_corpus(source, max_train_bytes=max_train_bytes, val_fraction=val_fraction,
                               stdlib_val=stdlib_val)
    tokenizer = _corpus.train_tokenizer(corp.train, vocab_size=cfg.vocab_size, out_dir=out)
    train_tokens = _corpus.tokenize(corp.train, tokenizer, progress=progress)
    val_tokens = _corpus.tokenize(corp.val, tokenizer, progress=progress)
    save_tensors(out / "tokens-train.safetensors", {"tokens": train_tokens}, {"corpus": corp.name})
    save_tensors(out / "tokens-val.safetensors", {"tokens": val_tokens}, {"corpus": corp.name})
    # corpus.json last: its presence says the tokenizer and both token files are complete.
    save_json(out / "corpus.json", {"name": corp.name, "source": source, "train_docs": corp.train_ids,
                                    "val_docs": corp.val_ids, "ctx_len": cfg.ctx_len,
                                    "train_tokens": train_tokens.numel(), "val_tokens": val_tokens.numel()})
    return tokenizer, train_tokens, val_tokens, corp.name
