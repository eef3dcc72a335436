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
import pickle
import sys
import urllib.request

import numpy as np
import tiktoken

# -----------------------------------------------------------------------------
out_dir = os.path.dirname(os.path.abspath(__file__))  # where input.txt is looked for and the outputs go
data_url = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
val_fraction = 0.1  # the last 10% of the text is the validation set
# -----------------------------------------------------------------------------
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))  # repo root, for configurator
from configurator import configure, fail
configure(globals())


def check_text(raw, name):
    """Bytes -> str, refusing what cannot be a text corpus (fail() exits with one line)."""
    if b'\0' in raw:
        fail(f"{name} looks binary (it contains NUL bytes)")
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError as e:
        fail(f"{name} is not UTF-8 text (bad byte at offset {e.start})")
    if not text.strip():
        fail(f"{name} is empty")
    return text


def temp_name(path):
    # a hidden name beside the final one: same folder, so os.replace is an atomic rename
    return os.path.join(os.path.dirname(path), f'.{os.path.basename(path)}.{os.getpid()}.tmp')


def download(url, path):
    # fetch into a temp file and rename, so an interrupted download never looks finished
    print(f"downloading {url}")
    tmp = temp_name(path)
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            raw = r.read()
        check_text(raw, url)
        with open(tmp, 'wb') as f:
            f.write(raw)
        os.replace(tmp, path)
    except (OSError, ValueError) as e:
        fail(f"could not download {url}: {e}")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_outputs(out_dir, arrays, meta):
    # everything goes to temp files first and is renamed into place only once all of it
    # is written, so a failure never leaves a train.bin without its val.bin or meta.pkl
    tmps = {name: temp_name(os.path.join(out_dir, name)) for name in [*arrays, 'meta.pkl']}
    try:
        for name, arr in arrays.items():
            arr.tofile(tmps[name])
        with open(tmps['meta.pkl'], 'wb') as f:
            pickle.dump(meta, f)
        for name, tmp in tmps.items():
            os.replace(tmp, os.path.join(out_dir, name))
    except OSError as e:
        fail(f"could not write to {out_dir}: {e}")
    finally:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.remove(tmp)


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
