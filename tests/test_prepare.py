"""
The data preparation scripts, run like a user would (python data/<name>/prepare.py ...),
offline: tiny Shakespeare and GPT-2's BPE files come from ../shared, URLs from a local
http.server, and every output goes to a tmp folder instead of the repo.
"""
import functools
import http.server
import json
import os
import pickle
import random
import re
import shutil
import threading

import numpy as np
import pytest

from conftest import REPO, SHAKESPEARE, SHARED, run_script

needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE.exists(), reason="../shared/data/tinyshakespeare missing")
needs_bpe = pytest.mark.skipif(not (SHARED / 'tiktoken_cache').is_dir(), reason="../shared/tiktoken_cache missing")

CHAR = 'data/shakespeare_char/prepare.py'
BPE = 'data/shakespeare/prepare.py'
OWT = 'data/openwebtext/prepare.py'
CUSTOM = 'data/custom/prepare.py'


def gpt2():
    import tiktoken
    return tiktoken.get_encoding('gpt2')


def load(out_dir):
    with open(out_dir / 'meta.pkl', 'rb') as f:
        meta = pickle.load(f)
    # memmap, the way train.py reads them
    train = np.memmap(out_dir / 'train.bin', dtype=meta['dtype'], mode='r')
    val = np.memmap(out_dir / 'val.bin', dtype=meta['dtype'], mode='r')
    return meta, train, val


def decode_chars(meta, ids):
    table = np.array([meta['itos'][i] for i in range(meta['vocab_size'])])
    return ''.join(table[np.asarray(ids)])


def assert_fails(args, out_dir, before=(), env=None):
    """The script exits 1 with one 'error: ...' line, no traceback, and leaves out_dir as it was."""
    proc = run_script(*args, check=False, env=env)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert 'Traceback' not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
    left = sorted(os.listdir(out_dir)) if out_dir.exists() else []
    assert left == sorted(before), f"left behind in {out_dir}: {left}"
    return lines[0]


@pytest.fixture
def http_root(tmp_path):
    """A folder served over http://127.0.0.1:<port>/ (loopback only) for the test's duration."""
    root = tmp_path / 'www'
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.1}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# a proxy in the environment must not get the loopback requests
NO_PROXY = {'no_proxy': '127.0.0.1,localhost', 'NO_PROXY': '127.0.0.1,localhost'}


# -----------------------------------------------------------------------------
# tiny Shakespeare

@needs_shakespeare
def test_shakespeare_char(tmp_path, shakespeare_text):
    shutil.copy(SHAKESPEARE, tmp_path / 'input.txt')
    proc = run_script(CHAR, f'--out_dir={tmp_path}')
    assert 'vocab size: 65' in proc.stdout
    meta, train, val = load(tmp_path)
    assert meta['vocab_size'] == 65 and meta['dtype'] == 'uint16'
    assert train.dtype == np.uint16 and len(train) == 1_003_854 and len(val) == 111_540
    assert all(meta['stoi'][meta['itos'][i]] == i for i in range(65))
    assert decode_chars(meta, train) == shakespeare_text[:1_003_854]
    assert decode_chars(meta, val) == shakespeare_text[1_003_854:]


@needs_shakespeare
@needs_bpe
def test_shakespeare_bpe(tmp_path, shakespeare_text):
    shutil.copy(SHAKESPEARE, tmp_path / 'input.txt')
    run_script(BPE, f'--out_dir={tmp_path}')
    meta, train, val = load(tmp_path)
    assert meta == {'tokenizer': 'gpt2', 'vocab_size': 50257, 'dtype': 'uint16'}
    assert len(train) == 301_966 and len(val) == 36_059
    assert max(train.max(), val.max()) < 50257
    enc = gpt2()
    head = enc.decode(train[:300].tolist())
    assert len(head) > 1000 and shakespeare_text.startswith(head)
    assert shakespeare_text.endswith(enc.decode(val[-300:].tolist()))


@needs_shakespeare
@pytest.mark.parametrize('script', [CHAR, pytest.param(BPE, marks=needs_bpe)])
@pytest.mark.parametrize('content', [b'', b' \n\n\t \n', b'To be\0or not', b'caf\xe9 latin-1'],
                         ids=['empty', 'whitespace', 'nul', 'not-utf8'])
def test_shakespeare_bad_input(tmp_path, script, content):
    (tmp_path / 'input.txt').write_bytes(content)
    assert_fails([script, f'--out_dir={tmp_path}'], tmp_path, before=['input.txt'])


def test_shakespeare_failed_download_leaves_nothing(tmp_path, http_root):
    _, url = http_root
    out = tmp_path / 'out'
    out.mkdir()
    msg = assert_fails([CHAR, f'--out_dir={out}', f'--data_url={url}/missing.txt'], out, env=NO_PROXY)
    assert 'could not download' in msg


# -----------------------------------------------------------------------------
# OpenWebText-style preparation, on a small local jsonl file

def owt_env(tmp_path):
    # keep datasets' cache out of the user's home
    return {'HF_HOME': str(tmp_path / 'hf'), 'HF_DATASETS_CACHE': str(tmp_path / 'hf' / 'datasets')}


@needs_bpe
def test_openwebtext_local_jsonl(tmp_path):
    rng = random.Random(0)
    words = "the king said that we shall go to London and see the <|endoftext|> queen".split()
    docs = [' '.join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(200)]
    with open(tmp_path / 'docs.jsonl', 'w') as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({'id': i, 'text': d}) + '\n')
    out = tmp_path / 'out'
    args = [OWT, '--dataset_name=json', f'--data_files={tmp_path / "docs.jsonl"}', '--num_proc=2',
            '--total_batches=7', '--val_fraction=0.05', f'--out_dir={out}']
    run_script(*args, env=owt_env(tmp_path))
    assert sorted(os.listdir(out)) == ['meta.pkl', 'train.bin', 'val.bin']
    meta, train, val = load(out)
    assert meta == {'tokenizer': 'gpt2', 'vocab_size': 50257, 'dtype': 'uint16'}

    enc = gpt2()
    eot = enc.eot_token
    assert (train == eot).sum() + (val == eot).sum() == len(docs)
    assert (val == eot).sum() == 10  # 5% of 200 documents
    assert train[-1] == eot and val[-1] == eot
    assert len(train) + len(val) == sum(len(enc.encode_ordinary(d)) + 1 for d in docs)
    # every document comes back whole, each once (in shuffled order)
    ids = np.concatenate([train, val]).tolist()
    pieces, start = [], 0
    for i, t in enumerate(ids):
        if t == eot:
            pieces.append(enc.decode(ids[start:i]))
            start = i + 1
    assert sorted(pieces) == sorted(docs)

    # a second run sees the outputs and does nothing
    before = {f: (out / f).stat().st_mtime_ns for f in os.listdir(out)}
    proc = run_script(*args, env=owt_env(tmp_path))
    assert 'nothing to do' in proc.stdout
    assert {f: (out / f).stat().st_mtime_ns for f in os.listdir(out)} == before


@needs_bpe
@pytest.mark.parametrize('content', [None, b'', b'{"text": "a\0b"}\n', b'\xff\xfe{"text": 1}\n'],
                         ids=['missing', 'empty', 'nul', 'not-utf8'])
def test_openwebtext_bad_input(tmp_path, content):
    data = tmp_path / 'docs.jsonl'
    if content is not None:
        data.write_bytes(content)
    out = tmp_path / 'out'
    assert_fails([OWT, '--dataset_name=json', f'--data_files={data}', '--num_proc=2', f'--out_dir={out}'], out,
                 env=owt_env(tmp_path))


# -----------------------------------------------------------------------------
# custom: a file, a folder or a URL, char or gpt2

TEXT = "First line of my notes.\nSecond line, with ünïcödé and emoji 🙂.\n" * 40


def test_custom_file_char(tmp_path):
    (tmp_path / 'notes.txt').write_text(TEXT, encoding='utf-8')
    out = tmp_path / 'out'
    run_script(CUSTOM, f'--input={tmp_path / "notes.txt"}', f'--out_dir={out}')
    meta, train, val = load(out)
    assert set(meta) == {'vocab_size', 'itos', 'stoi', 'dtype'}
    assert meta['vocab_size'] == len(set(TEXT)) and meta['dtype'] == 'uint16'
    split = int(len(TEXT) * 0.9)
    assert len(train) == split and len(val) == len(TEXT) - split
    assert decode_chars(meta, train) + decode_chars(meta, val) == TEXT


@needs_bpe
def test_custom_file_gpt2(tmp_path):
    (tmp_path / 'notes.txt').write_text(TEXT, encoding='utf-8')
    out = tmp_path / 'out'
    run_script(CUSTOM, f'--input={tmp_path / "notes.txt"}', '--tokenizer=gpt2', '--val_fraction=0.25',
               f'--out_dir={out}')
    meta, train, val = load(out)
    assert meta == {'tokenizer': 'gpt2', 'vocab_size': 50257, 'dtype': 'uint16'}
    enc = gpt2()
    split = int(len(TEXT) * 0.75)
    assert train.tolist() == enc.encode_ordinary(TEXT[:split])
    assert val.tolist() == enc.encode_ordinary(TEXT[split:])


@needs_bpe
def test_custom_file_trained_bpe(tmp_path):
    (tmp_path / 'notes.txt').write_text(TEXT * 5, encoding='utf-8')
    out = tmp_path / 'out'
    proc = run_script(CUSTOM, f'--input={tmp_path / "notes.txt"}', '--tokenizer=bpe', '--vocab_size=300',
                      '--val_fraction=0.25', f'--out_dir={out}')
    assert re.search(r'[\d.]+ bytes/token \(bpe, 300 tokens\), GPT-2: [\d.]+ bytes/token', proc.stdout), proc.stdout
    meta, train, val = load(out)
    assert meta['tokenizer'] == 'bpe' and meta['vocab_size'] == 300 and '<|assistant_end|>' in meta['special_tokens']
    from tokenizer import tokenizer_from_meta
    split = int(len(TEXT * 5) * 0.75)
    assert tokenizer_from_meta(meta).decode(val.tolist()) == (TEXT * 5)[split:]
    for bad in ('100', '70000'):  # too small for the 256 bytes, too large for uint16 ids
        proc = run_script(CUSTOM, f'--input={tmp_path / "notes.txt"}', '--tokenizer=bpe', f'--vocab_size={bad}',
                          f'--out_dir={tmp_path / bad}', check=False)
        assert proc.returncode == 1 and 'vocab_size must be between' in proc.stderr and not (tmp_path / bad).exists()


def test_custom_folder(tmp_path):
    src = tmp_path / 'corpus'
    (src / 'sub').mkdir(parents=True)
    (src / 'b.txt').write_text('bravo\n')
    (src / 'a.txt').write_text('alpha')  # no trailing newline: one is added
    (src / 'sub' / 'c.txt').write_text('charlie\n')
    (src / 'skip.md').write_text('not a .txt file\n')
    out = tmp_path / 'out'
    run_script(CUSTOM, f'--input={src}', '--val_fraction=0.3', f'--out_dir={out}')
    meta, train, val = load(out)
    assert decode_chars(meta, train) + decode_chars(meta, val) == 'alpha\n\nbravo\n\ncharlie\n'


def test_custom_url(tmp_path, http_root):
    root, url = http_root
    (root / 'book.txt').write_text(TEXT, encoding='utf-8')
    out = tmp_path / 'out'
    run_script(CUSTOM, f'--input={url}/book.txt', f'--out_dir={out}', env=NO_PROXY)
    assert (out / 'book.txt').read_text(encoding='utf-8') == TEXT
    meta, train, val = load(out)
    assert decode_chars(meta, train) + decode_chars(meta, val) == TEXT
    # the second run uses the downloaded copy: the server no longer has the file
    (root / 'book.txt').unlink()
    proc = run_script(CUSTOM, f'--input={url}/book.txt', f'--out_dir={out}', env=NO_PROXY)
    assert 'already downloaded' in proc.stdout
    assert sorted(os.listdir(out)) == ['book.txt', 'meta.pkl', 'train.bin', 'val.bin']


def test_custom_big_vocab_uses_uint32(tmp_path):
    # more distinct characters than uint16 ids can number (surrogates are not characters)
    chars = [chr(c) for c in range(0x100, 0x100 + 75_000) if not 0xD800 <= c <= 0xDFFF][:70_000]
    random.Random(0).shuffle(chars)
    text = ''.join(chars) * 2
    (tmp_path / 'big.txt').write_text(text, encoding='utf-8')
    out = tmp_path / 'out'
    run_script(CUSTOM, f'--input={tmp_path / "big.txt"}', f'--out_dir={out}')
    meta, train, val = load(out)
    assert meta['vocab_size'] == 70_000 and meta['dtype'] == 'uint32' and train.dtype == np.uint32
    assert decode_chars(meta, train) + decode_chars(meta, val) == text


def test_custom_default_out_dir_is_data_dataset(tmp_path):
    # without out_dir the outputs land in data/<dataset>/, where train.py --dataset=<dataset> looks
    (tmp_path / 'notes.txt').write_text(TEXT, encoding='utf-8')
    name = f'pytest_custom_{os.getpid()}'
    target = REPO / 'data' / name
    try:
        run_script(CUSTOM, f'--input={tmp_path / "notes.txt"}', f'--dataset={name}')
        assert sorted(os.listdir(target)) == ['meta.pkl', 'train.bin', 'val.bin']
    finally:
        shutil.rmtree(target, ignore_errors=True)


@pytest.mark.parametrize('case', ['missing', 'empty', 'whitespace', 'nul', 'not-utf8', 'too-small',
                                  'unknown-tokenizer', 'no-input', 'folder-without-txt', 'binary-in-folder'])
def test_custom_errors(tmp_path, case):
    src = tmp_path / 'in.txt'
    content = {'empty': b'', 'whitespace': b'  \n\n \t\n', 'nul': b'hello\0world\n' * 10,
               'not-utf8': b'caf\xe9\n' * 10, 'too-small': b'ab'}.get(case, TEXT.encode())
    src.write_bytes(content)
    args = [f'--input={src}']
    if case == 'missing':
        args = [f'--input={tmp_path / "nope.txt"}']
    elif case == 'unknown-tokenizer':
        args.append('--tokenizer=sentencepiece')
    elif case == 'no-input':
        args = []
    elif case in ('folder-without-txt', 'binary-in-folder'):
        folder = tmp_path / 'corpus'
        folder.mkdir()
        if case == 'binary-in-folder':
            (folder / 'good.txt').write_text(TEXT)
            (folder / 'image.txt').write_bytes(b'\x89PNG\0\0')
        else:
            (folder / 'notes.md').write_text(TEXT)
        args = [f'--input={folder}']
    out = tmp_path / 'out'
    assert_fails([CUSTOM, *args, f'--out_dir={out}'], out)
    assert not out.exists()


def test_custom_bad_url(tmp_path, http_root):
    root, url = http_root
    (root / 'blob.txt').write_bytes(b'\0\1\2\3' * 100)
    out = tmp_path / 'out'
    for name in ('missing.txt', 'blob.txt'):
        assert_fails([CUSTOM, f'--input={url}/{name}', f'--out_dir={out}'], out, env=NO_PROXY)
        assert not out.exists()  # the folder the download made is gone again


def test_custom_url_cut_short(tmp_path):
    """A download whose body ends before its Content-Length (IncompleteRead) is one line, and leaves nothing."""
    class CutShort(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header('Content-Length', '100000')
            self.end_headers()
            self.wfile.write(TEXT.encode()[:500])
            self.close_connection = True

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), CutShort)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / 'out'
        line = assert_fails([CUSTOM, f'--input=http://127.0.0.1:{server.server_address[1]}/book.txt', f'--out_dir={out}'],
                            out, env=NO_PROXY)
        assert 'IncompleteRead' in line and not out.exists()
    finally:
        server.shutdown()
        server.server_close()
