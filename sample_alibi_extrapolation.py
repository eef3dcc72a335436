"""
How well do trained models read windows longer than the block_size they were trained on?
For each out_dir: the loss over the whole val split, cut into non-overlapping windows of
1x, 2x and 4x the model's block_size, printed as a table.

An ALiBi (or rotary) model simply runs on the longer windows. A model with learned position
embeddings has no embedding for position block_size and beyond: its full-window row shows the
error, and a second row evaluates it with a sliding window instead, the way nanoGPT's
generate() crops: inside each long window, a token past the first block_size sees only the
last block_size tokens or fewer (the window slides `stride` tokens at a time).

The two models of docs/experiments.md's table (same CPU config, same iterations, float32):
$ python train.py config/train_shakespeare_char_cpu.py --dtype=float32 --use_alibi=True --out_dir=out-extrap-alibi
$ python train.py config/train_shakespeare_char_cpu.py --dtype=float32 --out_dir=out-extrap-learned
$ python sample_alibi_extrapolation.py

It also measures what inference settings cost in loss, e.g. int8 Linears on one model:
$ python sample_alibi_extrapolation.py --out_dirs="['out-shakespeare-char']" --factors=[1] --quantize=int8
"""
import os

import numpy as np
import torch

from configurator import configure, fail
from checkpoint import load_checkpoint
from common import check_device_dtype
from inference import for_inference
from tokenizer import read_meta

# -----------------------------------------------------------------------------
out_dirs = ['out-extrap-alibi', 'out-extrap-learned']  # checkpoints to compare
factors = [1, 2, 4]  # window lengths, in multiples of each model's training block_size
dataset = ''  # '' = the dataset each model was trained on (its checkpoint's config)
stride = 0  # the sliding window's step for learned positions; 0 = block_size // 2 (1 = exact crop, slow)
batch_size = 32  # windows per forward pass
device = 'cpu'
dtype = 'float32'  # the models' weights for the evaluation: 'float32', 'bfloat16', 'auto', ...
quantize = ''  # 'int8': every Linear int8, as sample.py --quantize=int8 runs them
# -----------------------------------------------------------------------------
configure(globals())


def val_tokens(ds):
    data_dir = os.path.join('data', ds)
    meta_path = os.path.join(data_dir, 'meta.pkl')
    dtype = read_meta(meta_path).get('dtype', 'uint16') if os.path.exists(meta_path) else 'uint16'
    path = os.path.join(data_dir, 'val.bin')
    if not os.path.exists(path):
        fail(f"{path} not found: run 'python {os.path.join(data_dir, 'prepare.py')}' first")
    return torch.from_numpy(np.fromfile(path, dtype=np.dtype(dtype)).astype(np.int64))


def token_losses(model, x, y):
    """Per-token cross-entropy, (B, T)."""
    logits, _ = model(x, y)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction='none').view(y.shape)


@torch.no_grad()
def full_window_loss(model, data, length):
    """Mean loss over non-overlapping windows of `length` tokens, each read in one forward pass."""
    n = (len(data) - 1) // length
    windows = data[:n * length + 1]
    total = 0.0
    for start in range(0, n, batch_size):
        rows = torch.arange(start, min(start + batch_size, n))
        idx = rows[:, None] * length + torch.arange(length + 1)
        w = windows[idx].to(device)
        total += token_losses(model, w[:, :-1], w[:, 1:]).sum().item()
    return total / (n * length)


@torch.no_grad()
def sliding_window_loss(model, data, length, block, step):
    """The same windows and tokens as full_window_loss, but a token at position i >= block in its
    window is scored by a forward over the `block` tokens ending at the end of its step-sized
    chunk: it sees between block - step and block - 1 tokens of context (never its whole window)."""
    n = (len(data) - 1) // length
    total = 0.0
    for start in range(0, n, batch_size):
        rows = torch.arange(start, min(start + batch_size, n))
        w = data[rows[:, None] * length + torch.arange(length + 1)].to(device)
        x, y = w[:, :-1], w[:, 1:]
        total += token_losses(model, x[:, :block], y[:, :block]).sum().item()  # the first block: as usual
        done = block
        while done < length:
            end = min(done + step, length)
            loss = token_losses(model, x[:, end - block:end], y[:, end - block:end])
            total += loss[:, done - end:].sum().item()  # the end - done tokens not scored yet
            done = end
    return total / (n * length)


table_rows = []
for out_dir in out_dirs:
    try:
        model, info = load_checkpoint(out_dir, device)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    try:
        model = for_inference(model, device, check_device_dtype(device, dtype), quantize)
    except ValueError as e:
        fail(str(e))
    cfg = model.config
    block = cfg.block_size
    ds = dataset or info.get('config', {}).get('dataset')
    if not ds:
        fail(f"{out_dir}: the checkpoint does not say its dataset; set --dataset")
    data = val_tokens(ds)
    kind = 'ALiBi' if cfg.use_alibi else 'RoPE' if cfg.use_rope else 'learned positions'
    name = f"{out_dir} ({kind}, block {block}, iter {info.get('iter_num', '?')})"
    full = []
    for f in factors:
        try:
            full.append(f"{full_window_loss(model, data, f * block):.4f}")
        except AssertionError as e:  # a learned-position model past block_size
            full.append(f"fails ({e})")
    table_rows.append((name, 'full windows', full))
    if cfg.learned_positions:
        step = stride or block // 2
        slide = [f"{sliding_window_loss(model, data, f * block, block, step):.4f}" for f in factors]
        table_rows.append((name, f'sliding window (stride {step}, context <= {block})', slide))

print(f"val loss over the whole val split, windows of {' / '.join(f'{f}x' for f in factors)} the training block_size\n")
header = ['model', 'evaluation'] + [f"{f}x" for f in factors]
table = [header, ['---'] * len(header)] + [[name, how, *vals] for name, how, vals in table_rows]
for line in table:
    print('| ' + ' | '.join(line) + ' |')
