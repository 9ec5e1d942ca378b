"""Write a Hugging Face hub cache entry by hand, as `huggingface_hub` lays it out (content-addressed blobs,
snapshots/<commit>/<file> links, refs/<revision> holding the commit), so code that loads a hub name can be tested
with HF_HUB_OFFLINE=1 and no network: a randomly initialised GPT-NeoX with Pythia-70M-deduped's config fields under
several revision refs, with a tokenizer, and a cached text dataset."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

PYTHIA = "EleutherAI/pythia-70m-deduped"
# Pythia-70M-deduped's architecture; "ci" keeps every field but shrinks the sizes so a test runs in seconds.
SIZES = {"full": dict(num_hidden_layers=6, hidden_size=512, num_attention_heads=8, intermediate_size=2048,
                      vocab_size=50304),
         # 544 rows for a 512-token tokenizer: like Pythia's 50304 for 50277 tokens, the unembedding has rows no
         # token text names (a logit lens or an ablation can still rank them).
         "ci": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, intermediate_size=256,
                    vocab_size=544)}


def add_revision(cache: Path, repo_id: str, src: Path, refs: list[str], repo_type: str = "model") -> str:
    """Copy src's files into the cache entry of repo_id and point refs at them; returns the commit id."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    files = sorted(p for p in src.rglob("*") if p.is_file())
    h = hashlib.sha1()
    for p in files:
        h.update(str(p.relative_to(src)).encode())
        h.update(p.read_bytes())
    commit = h.hexdigest()
    for p in files:
        blob = repo / "blobs" / hashlib.sha256(p.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(p, blob)
        link = repo / "snapshots" / commit / p.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)  # huggingface_hub reads refs without stripping a newline
    return commit


def make_pythia_cache(hf_home: Path, work: Path, size: str = "ci",
                      revisions: tuple[tuple[str, ...], ...] = (("step0",), ("step1000",), ("step143000", "main")),
                      tokenizer_vocab: int = 512) -> dict[str, str]:
    """A cache entry named EleutherAI/pythia-70m-deduped under hf_home/hub: one random GPT-NeoX per revision group
    (seeded by its position) with Pythia-70M-deduped's config fields at `size`, and a byte-level BPE trained on a
    slice of the standard library. Returns {first ref of each group: commit}."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from sparse_coding import corpus

    docs = corpus.load_corpus("stdlib", max_train_bytes=400_000).train
    commits = {}
    for i, refs in enumerate(revisions):
        d = work / f"rev{i}"
        tok = corpus.train_tokenizer(docs, vocab_size=tokenizer_vocab, out_dir=d)
        cfg = GPTNeoXConfig(**SIZES[size], max_position_embeddings=2048, rotary_pct=0.25, rotary_emb_base=10000,
                            use_parallel_residual=True, hidden_act="gelu", tie_word_embeddings=False,
                            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(i)
        GPTNeoXForCausalLM(cfg).save_pretrained(d)
        commits[refs[0]] = add_revision(hf_home / "hub", PYTHIA, d, list(refs))
    return commits


def add_cached_dataset(hf_home: Path, repo_id: str, texts: list[str], split: str = "train",
                       config: str = "default", commit: str = "0" * 40) -> Path:
    """A `datasets` cache entry for `repo_id` (column "text"), as a first online `load_dataset(repo_id)` leaves it
    under HF_HOME/datasets, so that it loads with HF_HUB_OFFLINE=1."""
    from datasets import Dataset, SplitDict, SplitInfo
    from datasets.arrow_writer import ArrowWriter
    from datasets.naming import camelcase_to_snakecase

    owner, name = repo_id.split("/")
    d = Path(hf_home) / "datasets" / f"{owner}___{camelcase_to_snakecase(name)}" / config / "0.0.0" / commit
    d.mkdir(parents=True, exist_ok=True)
    ds = Dataset.from_dict({"text": list(texts)})
    with ArrowWriter(path=str(d / f"{name}-{split}.arrow")) as w:
        w.write_table(ds.data.table)
        n, nbytes = w.finalize()
    info = ds.info.copy()
    info.config_name, info.dataset_name = config, name
    info.splits = SplitDict({split: SplitInfo(split, num_bytes=nbytes, num_examples=n, dataset_name=name)})
    info.write_to_directory(str(d))
    return d
