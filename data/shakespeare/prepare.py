"""
Tiny Shakespeare in GPT-2's BPE tokens (tiktoken's "gpt2" encoding).

    python data/shakespeare/prepare.py
    python train.py --dataset=shakespeare

Writes train.bin and val.bin (raw uint16 token ids: GPT-2's 50,257 ids fit in 16 bits)
and meta.pkl ({'tokenizer': 'gpt2', 'vocab_size': 50257, 'dtype': 'uint16'}) next to
this script; train.py pads the model's vocab to 50304 itself and sample.py decodes with
tiktoken. input.txt is downloaded only if it is not already there. The full file gives
301,966 train tokens and 36,059 val tokens.
"""
import os
import sys

import numpy as np
import tiktoken

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
try:
    enc = tiktoken.get_encoding('gpt2')
except Exception as e:  # no network and no TIKTOKEN_CACHE_DIR holding the BPE files
    fail(f"could not load tiktoken's gpt2 encoding: {type(e).__name__}: {e}")
os.makedirs(out_dir, exist_ok=True)
input_path = os.path.join(out_dir, 'input.txt')
if not os.path.exists(input_path):
    download(data_url, input_path)
with open(input_path, 'rb') as f:
    data = check_text(f.read(), input_path)
print(f"length of dataset in characters: {len(data):,}")

# split the text, then encode each part; encode_ordinary treats '<|endoftext|>' in the
# text as plain characters rather than the special token
n = len(data)
split = int(n * (1 - val_fraction))
train_ids = np.array(enc.encode_ordinary(data[:split]), dtype=np.uint16)
val_ids = np.array(enc.encode_ordinary(data[split:]), dtype=np.uint16)
if len(train_ids) < 2 or len(val_ids) < 2:
    fail(f"{input_path} is too small to split: {len(train_ids)} train and {len(val_ids)} val tokens (need 2 each)")
print(f"train has {len(train_ids):,} tokens")
print(f"val has {len(val_ids):,} tokens")

meta = {'tokenizer': 'gpt2', 'vocab_size': enc.n_vocab, 'dtype': 'uint16'}
write_outputs(out_dir, {'train.bin': train_ids, 'val.bin': val_ids}, meta)
print(f"wrote train.bin, val.bin and meta.pkl to {out_dir}")
