"""
Bits per byte: a base model's loss on a token file, in bits per byte of the text the tokens stand for, which
compares models with different tokenizers. train.py reports it on its val split; chat_eval.py --task=bpb on
any split of a prepared dataset (data/<dataset>/<split>.bin) or on any text file.
"""
import math
from contextlib import nullcontext

import numpy as np
import torch


def tokens_per_byte(targets, byte_lengths):
    """Targets per byte of their text (byte_lengths: bytes per id, 0 for special tokens); None if no bytes."""
    counts = np.bincount(targets, minlength=len(byte_lengths))[:len(byte_lengths)]
    n_bytes = int(counts @ np.asarray(byte_lengths))
    return len(targets) / n_bytes if n_bytes else None


@torch.no_grad()
def windowed_loss(model, data, block_size, batch_size, device, ctx=nullcontext(), mask=None, byte_lengths=None):
    """The mean loss over `data` (token ids) cut into consecutive non-overlapping windows, counting only the
    targets where `mask` (one per token) is 1 if there is one; and, given byte_lengths, the bits per byte of
    exactly those targets (else None)."""
    n_windows = (len(data) - 1) // block_size
    lengths = None if byte_lengths is None else torch.tensor(byte_lengths)
    nats, count, n_bytes = 0.0, 0, 0
    for start in range(0, n_windows, batch_size):
        ix = np.arange(start, min(start + batch_size, n_windows)) * block_size
        window = data[ix[:, None] + np.arange(block_size + 1)].astype(np.int64)
        if window.max() >= model.config.vocab_size:  # it would index past the embedding
            raise ValueError(f"token id {window.max()} is past the model's vocabulary of {model.config.vocab_size}")
        y = window[:, 1:]
        if mask is not None:
            y = np.where(mask[ix[:, None] + np.arange(1, block_size + 1)] == 1, y, -1)
        x, y = torch.from_numpy(window[:, :-1]).to(device), torch.from_numpy(np.ascontiguousarray(y)).to(device)
        n = int((y != -1).sum())
        if n:  # a window of another role's tokens only has nothing to count
            with ctx:
                _, loss = model(x, y)
            nats += loss.item() * n
            count += n
            if lengths is not None:
                n_bytes += int(lengths[y[y != -1].cpu()].sum())
    if not count:
        raise ValueError(f"no target to score: {len(data)} tokens make no window of {block_size} + 1")
    return nats / count, (nats / math.log(2) / n_bytes if n_bytes else None)
