"""
Helpers shared by the data/*/prepare.py scripts: refuse input that is not text, download
without leaving half a file, and write train.bin/val.bin/meta.pkl all or nothing.
"""
import http.client
import os
import pickle
import urllib.request

from configurator import fail


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
    # fetch into a temp file and rename, so an interrupted download never looks finished;
    # a failed one takes the output folder with it if this call created it
    print(f"downloading {url}")
    folder = os.path.dirname(path)
    made_folder = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    tmp = temp_name(path)
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            raw = r.read()
        check_text(raw, url)
        with open(tmp, 'wb') as f:
            f.write(raw)
        os.replace(tmp, path)
    except (OSError, ValueError, http.client.HTTPException) as e:  # IncompleteRead: the body was cut short
        fail(f"could not download {url}: {type(e).__name__}: {e}")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        if made_folder and not os.listdir(folder):
            os.rmdir(folder)


def write_outputs(out_dir, arrays, meta):
    # everything goes to temp files first and is renamed into place only once all of it
    # is written, so a failure never leaves a train.bin without its val.bin or meta.pkl
    tmps = {name: temp_name(os.path.join(out_dir, name)) for name in [*arrays, 'meta.pkl']}
    try:
        for name, arr in arrays.items():  # numpy arrays of token ids, or bytes (a .jsonl)
            if isinstance(arr, bytes):
                with open(tmps[name], 'wb') as f:
                    f.write(arr)
            else:
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


def print_compression(tokenizer, text, name='val'):
    """Bytes per token of `tokenizer` next to GPT-2's on the same text: more is better."""
    from tokenizer import gpt2_tokenizer
    n_bytes = len(text.encode('utf-8'))
    ours = n_bytes / max(1, len(tokenizer.encode(text)))
    try:
        gpt2 = f"{n_bytes / max(1, len(gpt2_tokenizer().encode(text))):.2f}"
    except Exception as e:  # no network and no TIKTOKEN_CACHE_DIR holding GPT-2's files
        gpt2 = f"unavailable ({type(e).__name__})"
    print(f"compression on the {name} text ({n_bytes:,} bytes): {ours:.2f} bytes/token "
          f"({tokenizer.name}, {tokenizer.n_vocab:,} tokens), GPT-2: {gpt2} bytes/token")
