"""
OpenWebText (or any Hugging Face / local dataset of documents) in GPT-2's BPE tokens.

    python data/openwebtext/prepare.py
    python data/openwebtext/prepare.py --dataset_name=json --data_files=my_docs.jsonl --out_dir=data/my_docs
    python data/openwebtext/prepare.py --dataset_name=text --data_files='books/*.txt' --out_dir=data/books

Each document is encoded with tiktoken's "gpt2" encoding and followed by the
<|endoftext|> token (50256), so the model sees where one document ends and the next
begins. All documents are concatenated into train.bin and val.bin (raw uint16 ids, read
back with np.memmap) plus meta.pkl ({'tokenizer': 'gpt2', 'vocab_size': 50257, 'dtype':
'uint16'}). For the real OpenWebText that is about 9B train tokens (~17GB) and 4M val
tokens; downloading and tokenising it takes a while and lots of disk, so the script
does nothing if train.bin and val.bin are already there.
"""
import glob
import os
import pickle
import sys

import numpy as np
import tiktoken
from tqdm import tqdm

# -----------------------------------------------------------------------------
dataset_name = 'openwebtext'  # a Hugging Face dataset, or a loader ('json', 'text', 'parquet') for data_files
data_files = ''  # local file(s) or a glob to load with dataset_name instead of the hub dataset
text_column = 'text'  # the column holding each document's text
num_proc = 8  # worker processes for loading and tokenising (capped at the number of CPUs)
val_fraction = 0.0005  # a random 0.05% of the documents is the validation set
total_batches = 1024  # each split is written to its memmap in this many pieces (bounds memory use)
out_dir = os.path.dirname(os.path.abspath(__file__))  # where train.bin, val.bin and meta.pkl go
# -----------------------------------------------------------------------------
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))  # repo root, for configurator
from configurator import configure, fail
from data.prepare_common import temp_name
configure(globals())

if all(os.path.exists(os.path.join(out_dir, f)) for f in ('train.bin', 'val.bin')):
    print(f"{out_dir} already has train.bin and val.bin, nothing to do (delete them to prepare again)")
    sys.exit(0)
if not 0 < val_fraction < 1:
    fail(f"val_fraction must be between 0 and 1, got {val_fraction}")
if total_batches < 1:
    fail(f"total_batches must be at least 1, got {total_batches}")
num_proc = max(1, min(num_proc, os.cpu_count() or 1))
try:
    enc = tiktoken.get_encoding('gpt2')
except Exception as e:  # no network and no TIKTOKEN_CACHE_DIR holding the BPE files
    fail(f"could not load tiktoken's gpt2 encoding: {type(e).__name__}: {e}")


def sniff(path, head_bytes=1 << 20):
    """'binary', 'empty' or 'text', judged from the first MiB so a huge file costs nothing."""
    with open(path, 'rb') as f:
        head = f.read(head_bytes)
    if b'\0' in head:
        return 'binary'
    try:
        head.decode('utf-8')
    except UnicodeDecodeError as e:
        # a multi-byte character cut off at the end of the head is fine
        if not (len(head) == head_bytes and e.start >= head_bytes - 3):
            return 'binary'
    return 'empty' if len(head) < head_bytes and not head.strip() else 'text'


# local files get checked here, where a clear message is possible; datasets' own errors
# for a missing, empty or binary file are cryptic
if data_files and '://' not in data_files:
    paths = sorted(p for p in glob.glob(os.path.expanduser(data_files), recursive=True) if os.path.isfile(p))
    if not paths:
        fail(f"data_files '{data_files}' not found")
    compressed = ('.gz', '.bz2', '.xz', '.zst', '.zip', '.lz4')
    if dataset_name in ('json', 'text', 'csv'):  # text formats; parquet/arrow are binary by design
        kinds = {p: sniff(p) for p in paths if not p.endswith(compressed)}
        for p, kind in kinds.items():
            if kind == 'binary':
                fail(f"{p} is not UTF-8 text (it looks binary)")
        if kinds and len(kinds) == len(paths) and all(k == 'empty' for k in kinds.values()):
            fail(f"data_files '{data_files}' is empty")

# imported here, not at the top: it is slow to import and --help should not wait for it
try:
    from datasets import load_dataset
except ImportError:  # not in requirements.txt: only this script needs it
    fail("this script needs Hugging Face's datasets: pip install datasets")


def one_line(e):
    # datasets' messages can span lines; the error contract is one line on stderr
    return ' '.join(f"{type(e).__name__}: {e}".split())


# load the documents; a hub dataset comes with a 'train' split only, which is all we use
try:
    dataset = load_dataset(dataset_name, data_files=data_files or None, num_proc=num_proc)
    docs = dataset['train']
except Exception as e:  # missing files, unreadable/binary files, no network, no 'train' split...
    fail(f"could not load dataset '{dataset_name}'{f' from {data_files}' if data_files else ''}: {one_line(e)}")
if text_column not in docs.column_names:
    fail(f"dataset has no column '{text_column}' (columns: {', '.join(docs.column_names)}); set --text_column")
if len(docs) < 2:
    fail(f"dataset has {len(docs)} document(s), need at least 2 to split into train and val")
print(f"{len(docs):,} documents")

# hold out a random val_fraction of the documents (the seed makes the split repeatable)
split_dataset = docs.train_test_split(test_size=val_fraction, seed=2357, shuffle=True)
split_dataset['val'] = split_dataset.pop('test')


def tokenize(example):
    text = example[text_column]
    ids = enc.encode_ordinary(text if isinstance(text, str) else '')
    ids.append(enc.eot_token)  # marks the end of the document
    return {'ids': ids, 'len': len(ids)}


try:
    tokenized = split_dataset.map(tokenize, remove_columns=docs.column_names, desc="tokenizing the splits",
                                  num_proc=num_proc)
except Exception as e:
    fail(f"tokenizing failed: {one_line(e)}")

# check both splits before writing anything
lengths = {split: int(np.sum(dset.with_format('numpy')['len'], dtype=np.uint64)) for split, dset in tokenized.items()}
if sum(lengths.values()) == len(docs):
    fail("every document is empty (only end-of-text tokens)")
for split, n in lengths.items():
    if n < 2:
        fail(f"the {split} split has {n} token(s), need at least 2 (more documents or a larger val_fraction)")


# concatenate each split into a memmap on disk, a contiguous shard of documents at a
# time, into temp files that are renamed into place only after everything is written
os.makedirs(out_dir, exist_ok=True)
tmps = {name: temp_name(os.path.join(out_dir, name)) for name in ('train.bin', 'val.bin', 'meta.pkl')}
try:
    for split, dset in tokenized.items():
        arr = np.memmap(tmps[f'{split}.bin'], dtype=np.uint16, mode='w+', shape=(lengths[split],))
        n_batches = min(total_batches, len(dset))
        idx = 0
        for batch_idx in tqdm(range(n_batches), desc=f"writing {split}.bin"):
            batch = dset.shard(num_shards=n_batches, index=batch_idx, contiguous=True).with_format('numpy')
            ids = np.concatenate(list(batch['ids']))
            arr[idx:idx + len(ids)] = ids
            idx += len(ids)
        arr.flush()
        del arr
        print(f"{split} has {lengths[split]:,} tokens")
    with open(tmps['meta.pkl'], 'wb') as f:
        pickle.dump({'tokenizer': 'gpt2', 'vocab_size': enc.n_vocab, 'dtype': 'uint16'}, f)
    for name, tmp in tmps.items():
        os.replace(tmp, os.path.join(out_dir, name))
except OSError as e:
    fail(f"could not write to {out_dir}: {e}")
finally:
    for tmp in tmps.values():
        if os.path.exists(tmp):
            os.remove(tmp)
print(f"wrote train.bin, val.bin and meta.pkl to {out_dir}")

# to read the tokens back later:
# train_ids = np.memmap(os.path.join(out_dir, 'train.bin'), dtype=np.uint16, mode='r')
