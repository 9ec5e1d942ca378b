"""A chunk damaged in place (same size, finite garbage) is caught the first time a store reads from it."""

import pytest
import torch

from sparse_coding.activations import ActivationStore
from sparse_coding.activations.layout import ChunkError


def test_damaged_chunk_is_named_on_first_read(make_store):
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    store = make_store(x, ctx_len=16, chunk_rows=32)
    torch.testing.assert_close(store.rows(range(64)), x)  # intact: reads fine (and is now checked)
    chunk = store.folder / store.manifest["chunks"][1]["file"]
    data = bytearray(chunk.read_bytes())
    data[-8:-4] = (1.5).hex().encode()[:4]  # flip bytes inside the last activation: still a finite float
    chunk.write_bytes(bytes(data))
    fresh = ActivationStore(store.folder)
    torch.testing.assert_close(fresh.rows(range(32)), x[:32])  # the intact chunk still reads
    with pytest.raises(ChunkError, match=chunk.name):
        fresh.rows([40])
    with pytest.raises(ChunkError, match="checksum"):
        ActivationStore(store.folder).all()
    with pytest.raises(ChunkError):
        ActivationStore(store.folder).verify()
