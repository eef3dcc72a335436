"""
Prepare your own text for training: a file, a folder of .txt files, or a URL.

    python data/custom/prepare.py --input=notes.txt --dataset=notes
    python data/custom/prepare.py --input=my_corpus/ --tokenizer=gpt2 --dataset=corpus
    python data/custom/prepare.py --input=https://example.com/book.txt --dataset=book
    python data/custom/prepare.py --input=notes.txt --tokenizer=bpe --vocab_size=4096 --dataset=notes
    python train.py --dataset=notes

Writes train.bin and val.bin (raw token ids, read back with np.memmap) and meta.pkl to
data/<dataset>/, where train.py looks for them. With tokenizer='char' every distinct
character is a token and meta.pkl holds the itos/stoi tables; with 'gpt2' the text is
encoded with GPT-2's BPE (tiktoken) and meta.pkl just names the tokenizer; with 'bpe' a BPE
of vocab_size tokens is trained on the train text (rustbpe) and meta.pkl holds it, with the
chat special tokens (so data/chat/prepare.py --tokenizer_from=data/<dataset> can reuse it).
The last val_fraction of the text is the validation set.
"""
import glob
import os
import sys
import urllib.parse
import urllib.request

import numpy as np

# -----------------------------------------------------------------------------
input = ''  # a text file, a folder (every *.txt under it, in sorted order) or an http(s):// URL
tokenizer = 'char'  # 'char' (one token per character), 'gpt2' (GPT-2's BPE via tiktoken) or 'bpe' (trained here)
vocab_size = 4096  # with tokenizer='bpe': 256 bytes + merges + 5 special tokens, at most 65536 (uint16 ids)
val_fraction = 0.1  # the last 10% of the text is the validation set
dataset = 'custom'  # outputs go to data/<dataset>/, so `python train.py --dataset=<dataset>` finds them
out_dir = ''  # write here instead of data/<dataset>/
# -----------------------------------------------------------------------------
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))  # repo root, for configurator
from configurator import configure, fail
from data.prepare_common import check_text, download, print_compression, write_outputs
from tokenizer import MAX_VOCAB, SPECIAL_TOKENS, tokenizer_from_meta, train_bpe
configure(globals())
repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_text(path):
    with open(path, 'rb') as f:
        return check_text(f.read(), path)


# check the settings before touching any file
if tokenizer not in ('char', 'gpt2', 'bpe'):
    fail(f"unknown tokenizer '{tokenizer}' (use 'char', 'gpt2' or 'bpe')")
if tokenizer == 'bpe' and not 257 + len(SPECIAL_TOKENS) <= vocab_size <= MAX_VOCAB:
    fail(f"vocab_size must be between {257 + len(SPECIAL_TOKENS)} (256 bytes, a merge and {len(SPECIAL_TOKENS)} special "
         f"tokens) and {MAX_VOCAB} (token ids are stored as uint16), not {vocab_size}")
if not 0 < val_fraction < 1:
    fail(f"val_fraction must be between 0 and 1, got {val_fraction}")
if not input:
    fail("no input given: use --input=<text file, folder of .txt files, or http(s) URL>")
if not out_dir and not dataset:
    fail("no output folder: set --dataset=<name> (or --out_dir)")
out_dir = out_dir or os.path.join(repo_root, 'data', dataset)
if tokenizer == 'gpt2':
    import tiktoken
    try:
        enc = tiktoken.get_encoding('gpt2')
    except Exception as e:  # no network and no TIKTOKEN_CACHE_DIR holding the BPE files
        fail(f"could not load tiktoken's gpt2 encoding: {type(e).__name__}: {e}")

# gather the text
if input.startswith(('http://', 'https://')):
    name = os.path.basename(urllib.parse.urlparse(input).path) or 'input.txt'
    path = os.path.join(out_dir, name)
    if os.path.exists(path):
        print(f"{path} already downloaded")
    else:
        download(input, path)
    data = read_text(path)
elif os.path.isdir(input):
    files = sorted(glob.glob(os.path.join(input, '**', '*.txt'), recursive=True))
    if not files:
        fail(f"no .txt files under {input}")
    print(f"reading {len(files)} .txt files under {input}")
    texts = [read_text(p) for p in files]
    # one blank line between files: each file ends with a newline, then one more
    data = '\n'.join(t if t.endswith('\n') else t + '\n' for t in texts)
elif os.path.isfile(input):
    data = read_text(input)
else:
    fail(f"input '{input}' not found")
print(f"length of dataset in characters: {len(data):,}")

# split the text (not the ids) so that val is exactly its tail, then encode each part
n = len(data)
split = int(n * (1 - val_fraction))
if tokenizer == 'char':
    chars = sorted(set(data))
    vocab_size = len(chars)
    print(f"vocab size: {vocab_size:,}")
    # ids 0..65535 fit in uint16; a bigger vocab (e.g. CJK text) needs uint32
    dtype = np.uint16 if vocab_size <= 65535 else np.uint32
    # fast for big files: each character's code point, looked up in the sorted vocabulary's
    # code points, is its id (no per-character Python loop)
    codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)
    ids = np.searchsorted(codepoints, np.frombuffer(data.encode('utf-32-le'), dtype=np.uint32)).astype(dtype)
    train_ids, val_ids = ids[:split], ids[split:]
    meta = {'vocab_size': vocab_size, 'itos': dict(enumerate(chars)), 'stoi': {c: i for i, c in enumerate(chars)},
            'dtype': np.dtype(dtype).name}
elif tokenizer == 'bpe':
    print(f"training a BPE tokenizer of {vocab_size:,} tokens on the train text...")
    meta = train_bpe([data[:split]], vocab_size)
    enc = tokenizer_from_meta(meta)
    print_compression(enc, data[split:])
    train_ids = np.array(enc.encode(data[:split]), dtype=np.uint16)
    val_ids = np.array(enc.encode(data[split:]), dtype=np.uint16)
else:
    print("encoding with GPT-2's BPE...")
    # encode_ordinary: '<|endoftext|>' in the text stays plain characters
    train_ids = np.array(enc.encode_ordinary(data[:split]), dtype=np.uint16)
    val_ids = np.array(enc.encode_ordinary(data[split:]), dtype=np.uint16)
    meta = {'tokenizer': 'gpt2', 'vocab_size': enc.n_vocab, 'dtype': 'uint16'}
if len(train_ids) < 2 or len(val_ids) < 2:
    fail(f"input '{input}' is too small to split: {len(train_ids)} train and {len(val_ids)} val tokens (need 2 each)")
print(f"train has {len(train_ids):,} tokens")
print(f"val has {len(val_ids):,} tokens")

os.makedirs(out_dir, exist_ok=True)
write_outputs(out_dir, {'train.bin': train_ids, 'val.bin': val_ids}, meta)
print(f"wrote train.bin, val.bin and meta.pkl to {out_dir}")
