"""
Tiny Shakespeare, one token per character.

    python data/shakespeare_char/prepare.py
    python train.py --dataset=shakespeare_char

Writes train.bin and val.bin (raw uint16 token ids, read back with np.memmap) and
meta.pkl (vocab_size, the itos/stoi tables to decode and encode, dtype) next to this
script. input.txt is downloaded only if it is not already there, so an offline machine
can copy the file in first. The full file gives vocab 65, 1,003,854 train tokens and
111,540 val tokens.
"""
import os
import sys

import numpy as np

# -----------------------------------------------------------------------------
out_dir = os.path.dirname(os.path.abspath(__file__))  # where input.txt is looked for and the outputs go
data_url = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
val_fraction = 0.1  # the last 10% of the text is the validation set
# -----------------------------------------------------------------------------
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))  # repo root, for configurator
from configurator import configure, fail
from data.prepare_common import check_text, download, write_outputs
configure(globals())


if not 0 < val_fraction < 1:
    fail(f"val_fraction must be between 0 and 1, got {val_fraction}")
os.makedirs(out_dir, exist_ok=True)
input_path = os.path.join(out_dir, 'input.txt')
if not os.path.exists(input_path):
    download(data_url, input_path)
with open(input_path, 'rb') as f:
    data = check_text(f.read(), input_path)
print(f"length of dataset in characters: {len(data):,}")

# the vocabulary is every character that occurs, in sorted order
chars = sorted(set(data))
vocab_size = len(chars)
print("all the unique characters:", ''.join(chars))
print(f"vocab size: {vocab_size:,}")
stoi = {ch: i for i, ch in enumerate(chars)}
itos = {i: ch for i, ch in enumerate(chars)}

# split the text (not the ids) so that val is exactly the tail of the file
n = len(data)
split = int(n * (1 - val_fraction))
train_ids = np.array([stoi[c] for c in data[:split]], dtype=np.uint16)
val_ids = np.array([stoi[c] for c in data[split:]], dtype=np.uint16)
if len(train_ids) < 2 or len(val_ids) < 2:
    fail(f"{input_path} is too small to split: {len(train_ids)} train and {len(val_ids)} val tokens (need 2 each)")
print(f"train has {len(train_ids):,} tokens")
print(f"val has {len(val_ids):,} tokens")

meta = {'vocab_size': vocab_size, 'itos': itos, 'stoi': stoi, 'dtype': 'uint16'}
write_outputs(out_dir, {'train.bin': train_ids, 'val.bin': val_ids}, meta)
print(f"wrote train.bin, val.bin and meta.pkl to {out_dir}")
