"""
serve.py as a user runs it: a subprocess on a free loopback port serving a tiny random
char-level checkpoint, talked to with the official openai client and with raw HTTP.
"""
import contextlib
import http.client
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import numpy as np
import pytest
import torch

from conftest import REPO
from model import GPT, GPTConfig

openai = pytest.importorskip('openai')

# every character a test prompt uses, and the chat template's
TEXT = ("System: User: Assistant: the quick brown fox jumps over the lazy dog.\n"
        "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG!?,;'-\n")
CHARS = sorted(set(TEXT))
MAX_TOKENS_LIMIT = 4000
MAX_BATCH = 4
MAX_BODY = 20_000


def write_checkpoint(out_dir, iter_num=3, seed=0, block_size=64, vocab_size=None, meta=True, **switches):
    """A random-weights checkpoint in train.py's format, with a char-level meta.pkl next to it
    (or none: then the tokenizer is GPT-2's)."""
    os.makedirs(out_dir, exist_ok=True)
    model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=block_size, bias=False,
                      vocab_size=vocab_size or len(CHARS), dropout=0.0, **switches)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**model_args))
    torch.save({'model': model.state_dict(), 'optimizer': {}, 'model_args': model_args, 'iter_num': iter_num,
                'best_val_loss': 3.25, 'config': {'dataset': 'tiny_chars', 'n_layer': 2}},
               os.path.join(out_dir, 'ckpt.pt'))
    if not meta:
        return str(out_dir)
    with open(os.path.join(out_dir, 'meta.pkl'), 'wb') as f:
        pickle.dump({'vocab_size': len(CHARS), 'stoi': {c: i for i, c in enumerate(CHARS)},
                     'itos': {i: c for i, c in enumerate(CHARS)}}, f)
    return str(out_dir)


def write_dataset(folder):
    """A tiny char dataset in prepare.py's format (train.bin, val.bin, meta.pkl) for train.py."""
    os.makedirs(folder, exist_ok=True)
    ids = np.array([CHARS.index(c) for c in TEXT * 40], dtype=np.uint16)
    ids[: len(ids) * 9 // 10].tofile(os.path.join(folder, 'train.bin'))
    ids[len(ids) * 9 // 10:].tofile(os.path.join(folder, 'val.bin'))
    with open(os.path.join(folder, 'meta.pkl'), 'wb') as f:
        pickle.dump({'vocab_size': len(CHARS), 'stoi': {c: i for i, c in enumerate(CHARS)},
                     'itos': {i: c for i, c in enumerate(CHARS)}}, f)
    return str(folder)


@contextlib.contextmanager
def project_dataset():
    """A tiny char dataset in the project's data/ folder (runs started from the page may read
    only those), removed afterwards; yields its name."""
    name = f'_test_{uuid.uuid4().hex[:8]}'
    try:
        write_dataset(REPO / 'data' / name)
        yield name
    finally:
        shutil.rmtree(REPO / 'data' / name, ignore_errors=True)


def tiny_run_overrides(dataset, out_dir, max_iters=100000):
    # a 1-layer model that trains in milliseconds per iteration; absolute paths, so the cwd does not matter
    return [f'--dataset={dataset}', f'--out_dir={out_dir}', '--device=cpu', '--compile=False', '--dtype=float32',
            '--n_layer=1', '--n_head=2', '--n_embd=16', '--block_size=16', '--batch_size=4',
            f'--max_iters={max_iters}', f'--lr_decay_iters={max_iters}', '--warmup_iters=0', '--eval_interval=5',
            '--eval_iters=2', '--log_interval=1']


def start_server(log_dir, out_dir, *args):
    """Start serve.py on a free port; return (process, base url)."""
    log_path = os.path.join(log_dir, f'serve-{uuid.uuid4().hex[:6]}.log')
    log = open(log_path, 'w')
    # runs started from the page may write under the temporary folder, where the tests keep their out_dirs
    proc = subprocess.Popen([sys.executable, 'serve.py', f'--out_dir={out_dir}', '--port=0', '--device=cpu',
                             '--dtype=float32', f'--train_root={tempfile.gettempdir()}', *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1'))
    # one thread: for a model this small, more threads only wait on each other (and on a busy machine, a lot)
    deadline = time.time() + 120
    while time.time() < deadline:
        with open(log_path) as f:
            text = f.read()
        match = re.search(r'serving .* on (http://[\d.]+:\d+)', text)
        if match:
            proc.log_path = log_path
            return proc, match.group(1)
        if proc.poll() is not None:
            raise AssertionError(f"serve.py exited {proc.returncode}:\n{text}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("serve.py did not start")


def stop_server(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp('serve')
    out_dir = write_checkpoint(folder / 'out-tiny')
    proc, url = start_server(str(folder), out_dir, f'--max_tokens_limit={MAX_TOKENS_LIMIT}',
                             f'--max_batch_size={MAX_BATCH}', f'--max_body_bytes={MAX_BODY}', '--request_timeout=3')
    yield url
    if proc.poll() is None:
        stop_server(proc)


def client(url, key='unused'):
    return openai.OpenAI(base_url=url + '/v1', api_key=key, max_retries=0, timeout=60)


def raw(url, method, path, body=b'', headers=None):
    """One HTTP request; returns (status, parsed JSON body or None)."""
    host, port = url.removeprefix('http://').split(':')
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    try:
        return response.status, json.loads(data)
    except ValueError:
        return response.status, None


def health(url):
    status, body = raw(url, 'GET', '/health')
    assert status == 200
    return body


# -----------------------------------------------------------------------------

def test_completions(server):
    c = client(server)
    r = c.completions.create(model='tiny', prompt='the quick', max_tokens=30, temperature=0.9)
    assert r.object == 'text_completion' and r.id.startswith('cmpl-') and r.model
    assert len(r.choices) == 1 and r.choices[0].finish_reason == 'length'
    assert len(r.choices[0].text) == 30  # one character per token, and no stop sequence
    assert set(r.choices[0].text) <= set(CHARS)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (9, 30, 39)
    # echo puts the prompt in front
    r = c.completions.create(model='tiny', prompt='the quick', max_tokens=5, echo=True)
    assert r.choices[0].text.startswith('the quick') and len(r.choices[0].text) == 14

    stream = c.completions.create(model='tiny', prompt='the quick', max_tokens=25, stream=True,
                                  stream_options={'include_usage': True})
    text, finish, usage = '', None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
    assert len(text) == 25 and finish == 'length'
    assert (usage.prompt_tokens, usage.completion_tokens) == (9, 25)


def test_chat(server):
    c = client(server)
    messages = [{'role': 'system', 'content': 'be brief'}, {'role': 'user', 'content': 'the fox?'},
                {'role': 'assistant', 'content': 'the dog.'}, {'role': 'user', 'content': 'and?'}]
    r = c.chat.completions.create(model='tiny', messages=messages, max_tokens=40, seed=3)
    assert r.object == 'chat.completion' and r.id.startswith('chatcmpl-')
    choice = r.choices[0]
    assert choice.message.role == 'assistant' and choice.finish_reason in ('stop', 'length')
    assert '\nUser:' not in choice.message.content
    prompt = "System: be brief\nUser: the fox?\nAssistant: the dog.\nUser: and?\nAssistant:"
    assert r.usage.prompt_tokens == len(prompt) and 1 <= r.usage.completion_tokens <= 40

    stream = c.chat.completions.create(model='tiny', messages=messages, max_tokens=40, seed=3, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == 'assistant'
    content = ''.join(ch.choices[0].delta.content or '' for ch in chunks if ch.choices)
    assert content == choice.message.content  # the same seed gives the same reply, streamed or not
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_chat_stop_sequence(server):
    # a chat reply ends at a stop sequence of its own too, with finish_reason "stop"
    c = client(server)
    for seed in range(40):
        r = c.chat.completions.create(model='tiny', messages=[{'role': 'user', 'content': 'hi'}], max_tokens=8,
                                      seed=seed, temperature=0.7, stop=['o'])
        if r.choices[0].finish_reason == 'stop':
            assert 'o' not in r.choices[0].message.content
            return
    pytest.fail("no reply ever reached the stop sequence 'o'")


def test_stop_sequences_and_seed(server):
    c = client(server)
    full = c.completions.create(model='tiny', prompt='the', max_tokens=60, seed=11).choices[0].text
    assert c.completions.create(model='tiny', prompt='the', max_tokens=60, seed=11).choices[0].text == full
    assert c.completions.create(model='tiny', prompt='the', max_tokens=60, seed=12).choices[0].text != full
    stop = full[30:33]
    expected = full[:full.index(stop)]
    r = c.completions.create(model='tiny', prompt='the', max_tokens=60, seed=11, stop=[stop, '@@'])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == 'stop'
    streamed = ''.join(ch.choices[0].text for ch in c.completions.create(
        model='tiny', prompt='the', max_tokens=60, seed=11, stop=stop, stream=True) if ch.choices)
    assert streamed == expected


def test_n_and_prompt_lists(server):
    c = client(server)
    r = c.completions.create(model='tiny', prompt='dog', max_tokens=20, n=3, seed=5)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert len({ch.text for ch in r.choices}) == 3  # each choice samples on its own
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 60
    again = c.completions.create(model='tiny', prompt='dog', max_tokens=20, n=3, seed=5)
    assert [ch.text for ch in again.choices] == [ch.text for ch in r.choices]
    # two prompts x n=2: choices 0,1 continue the first prompt, 2,3 the second
    r = c.completions.create(model='tiny', prompt=['dog', 'fox'], max_tokens=10, n=2, seed=5, echo=True)
    assert [ch.text[:3] for ch in sorted(r.choices, key=lambda ch: ch.index)] == ['dog', 'dog', 'fox', 'fox']


def test_penalties_are_accepted(server):
    r = client(server).completions.create(model='tiny', prompt='the', max_tokens=20, presence_penalty=1.5,
                                          frequency_penalty=0.5, extra_body={'repetition_penalty': 1.3, 'top_k': 5},
                                          top_p=0.9)
    assert len(r.choices[0].text) == 20


BAD_REQUESTS = [
    # (method, path, body, status)
    ('POST', '/v1/completions', b'{not json', 400),
    ('POST', '/v1/completions', b'[1, 2]', 400),
    ('POST', '/v1/completions', b'\xff\xfe{"prompt": "a"}', 400),
    ('POST', '/v1/completions', b'[' * 10000, 400),
    ('POST', '/v1/completions', b'{"prompt": "a", "temperature": NaN}', 400),
    ('POST', '/v1/completions', {}, 400),
    ('POST', '/v1/completions', {'prompt': 5}, 400),
    ('POST', '/v1/completions', {'prompt': []}, 400),
    ('POST', '/v1/completions', {'prompt': ['a', 7]}, 400),
    ('POST', '/v1/completions', {'prompt': 'caf\u00e9 \u20ac'}, 400),  # not in the char vocabulary
    ('POST', '/v1/completions', {'prompt': 'a', 'max_tokens': 0}, 400),
    ('POST', '/v1/completions', {'prompt': 'a', 'max_tokens': MAX_TOKENS_LIMIT + 1}, 400),
    ('POST', '/v1/completions', {'prompt': 'a', 'max_tokens': '10'}, 400),
    ('POST', '/v1/completions', {'prompt': 'a', 'max_tokens': True}, 400),
    ('POST', '/v1/completions', {'prompt': 'a', 'temperature': -0.1}, 400),
    ('POST', '/v1/completions', {'prompt': 'a', 'temperature': 'hot'}, 400),
    ('POST', '/v1/completions', {'prompt': 'a', 'top_p': 0}, 400),
    ('POST', '/v1/completions', {'prompt': 'a', 'top_p': 1.5}, 400),
    ('POST', '/v1/completions', {'prompt': 'a', 'top_k': -1}, 400),
    ('POST', '/v1/completions', {'prompt': 'a', 'n': 0}, 400),
    ('POST', '/v1/completions', {'prompt': 'a', 'n': MAX_BATCH + 1}, 400),
    ('POST', '/v1/completions', {'prompt': 'a', 'stop': 5}, 400),
    ('POST', '/v1/completions', {'prompt': 'a', 'stop': ['a', 'b', 'c', 'd', 'e']}, 400),
    ('POST', '/v1/completions', {'prompt': 'a', 'stream': 'yes'}, 400),
    ('POST', '/v1/completions', {'prompt': 'a', 'seed': -1}, 400),
    ('POST', '/v1/completions', {'prompt': 'a', 'presence_penalty': 3}, 400),
    ('POST', '/v1/completions', {'prompt': 'a', 'repetition_penalty': 0}, 400),
    ('POST', '/v1/completions', {'prompt': 'a' * (MAX_BODY + 10)}, 413),
    ('POST', '/v1/chat/completions', {}, 400),
    ('POST', '/v1/chat/completions', {'messages': 'hi'}, 400),
    ('POST', '/v1/chat/completions', {'messages': []}, 400),
    ('POST', '/v1/chat/completions', {'messages': [5]}, 400),
    ('POST', '/v1/chat/completions', {'messages': [{'role': 'wizard', 'content': 'hi'}]}, 400),
    ('POST', '/v1/chat/completions', {'messages': [{'role': 'user', 'content': 5}]}, 400),
    ('POST', '/v1/chat/completions', {'messages': [{'role': 'user', 'content': '\u00fc'}]}, 400),
    ('POST', '/v1/chat/completions', {'messages': [{'role': 'user', 'content': 'hi'}], 'top_p': -1}, 400),
    ('POST', '/v1/chat/completions', {'messages': [{'role': 'user'}]}, 400),
    ('POST', '/v1/chat/completions', {'messages': [{'role': 'user', 'content': None}]}, 400),
    ('POST', '/v1/chat/completions', {'messages': [{'role': 'tool', 'content': 'x'}]}, 400),
    ('POST', '/v1/completions', {'prompt': 'a', 'logit_bias': {'x': 1}}, 400),
    ('POST', '/v1/completions', {'prompt': 'a', 'logit_bias': {'1': 101}}, 400),
    ('POST', '/v1/completions', {'prompt': 'a', 'logit_bias': {'99999': 1}}, 400),
    ('POST', '/v1/completions', {'prompt': 'a', 'logit_bias': [1]}, 400),
    ('POST', '/v1/completions', {'prompt': 'a', 'temperature': 1e400}, 400),
    ('GET', '/nowhere', b'', 404),
    ('POST', '/v1/nowhere', {'prompt': 'a'}, 404),
    ('GET', '/v1/completions', b'', 405),
    ('DELETE', '/health', b'', 405),
    ('FROB', '/health', b'', 405),
    ('GET', '/api/train/log?offset=-1', b'', 400),
    ('GET', '/api/train/log?offset=abc', b'', 400),
    ('POST', '/api/model/load', {'out_dir': 5}, 400),
    ('POST', '/api/model/load', {'out_dir': '/no/such/dir'}, 403),  # outside the server's roots
    ('POST', '/api/train/start', {'config': 5}, 400),
]


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server):
    for method, path, body, expected in BAD_REQUESTS:
        status, reply = raw(server, method, path, body, {'Content-Type': 'application/json'})
        assert status == expected, (method, path, body if len(str(body)) < 200 else '...', status, reply)
        assert set(reply['error']) == {'message', 'type', 'param', 'code'}, reply
        assert reply['error']['message']
    assert health(server)['status'] == 'ok'
    with pytest.raises(openai.BadRequestError):
        client(server).completions.create(model='tiny', prompt='a', max_tokens=-5)
    assert client(server).completions.create(model='tiny', prompt='a', max_tokens=3).choices[0].text


def test_chat_errors_name_the_message_and_unknown_fields_are_ignored(server):
    for messages, param in [([{'role': 'user'}], 'messages[0].content'),
                            ([{'role': 'system', 'content': 'be'}, {'role': 'robot', 'content': 'x'}], 'messages[1].role'),
                            ([{'role': 'user', 'content': [{'type': 'image'}]}], 'messages[0].content')]:
        status, reply = raw(server, 'POST', '/v1/chat/completions', {'messages': messages})
        assert status == 400 and reply['error']['param'] == param, reply
    # fields this server does not know are ignored, as OpenAI's server ignores them
    status, reply = raw(server, 'POST', '/v1/completions', {'prompt': 'the', 'max_tokens': 3, 'user': 'me',
                                                            'suffix': None, 'best_of': 1, 'frobnicate': [1, 2]})
    assert status == 200 and len(reply['choices'][0]['text']) == 3


def test_logit_bias(server):
    x, e = str(CHARS.index('x')), str(CHARS.index('e'))
    r = client(server).completions.create(model='tiny', prompt='the', max_tokens=20, logit_bias={x: 100}, seed=1)
    assert r.choices[0].text == 'x' * 20
    # -100 bans a token: a model forced to pick between two tokens, one banned, picks the other
    bias = {str(i): -100 for i in range(len(CHARS)) if str(i) != e}
    r = client(server).completions.create(model='tiny', prompt='the', max_tokens=20, logit_bias=bias, seed=1)
    assert r.choices[0].text == 'e' * 20


def test_a_slow_body_gets_408(server):
    host, port = server.removeprefix('http://').split(':')
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                 b'Content-Length: 100\r\n\r\n{')
    t0 = time.time()
    answer = b''
    try:
        for _ in range(10):  # a byte every second: the server gives the whole body 3 seconds
            time.sleep(1)
            sock.sendall(b' ')
    except OSError:
        pass  # the server answered and closed
    while chunk := sock.recv(4096):
        answer += chunk
    assert answer.startswith(b'HTTP/1.0 408') and b'did not arrive' in answer, answer
    assert time.time() - t0 < 8
    assert health(server)['status'] == 'ok'


def test_64_concurrent_streams_each_complete_or_get_429(server):
    """A burst of 64 streaming clients on a server of 4 rows: every client hears back, with a
    whole stream or a 429; none is refused at the socket or left waiting."""
    results = [None] * 64

    def stream(i):
        try:
            host, port = server.removeprefix('http://').split(':')
            conn = http.client.HTTPConnection(host, int(port), timeout=120)
            conn.request('POST', '/v1/completions', json.dumps({'prompt': 'the', 'max_tokens': 16, 'stream': True,
                                                                 'seed': i}), {'Content-Type': 'application/json'})
            response = conn.getresponse()
            body = response.read().decode()
            results[i] = 429 if response.status == 429 else ('ok' if body.endswith('data: [DONE]\n\n') else (response.status, body))
        except Exception as e:
            results[i] = repr(e)
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(64)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert all(r in ('ok', 429) for r in results), [r for r in results if r not in ('ok', 429)][:3]
    assert results.count('ok') >= 8 and time.time() - t0 < 150


@pytest.mark.parametrize('setting', ['--threads=-1', '--max_batch_size=0'])
def test_bad_server_settings_are_one_line_and_exit_1(tmp_path, setting):
    proc = subprocess.run([sys.executable, 'serve.py', f'--out_dir={tmp_path}', '--port=0', setting],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1 and 'threads >= 0' in proc.stderr


def test_a_tokenizer_that_does_not_fit_is_refused_at_load(server, tmp_path):
    # a 37-character model without its meta.pkl would get GPT-2's BPE: refused, and the old model stays
    out_dir = write_checkpoint(tmp_path / 'out-no-meta', meta=False)
    status, reply = raw(server, 'POST', '/api/model/load', {'out_dir': out_dir})
    assert status == 400 and 'does not match' in reply['error']['message'], reply
    assert raw(server, 'GET', '/api/model')[1]['id'] == 'out-tiny'


def test_padded_vocabulary_streams_decode(server, tmp_path):
    """A GPT-2-BPE model trained here has 50304 ids, 47 of which GPT-2's tokenizer cannot
    decode: 8 concurrent streams all complete."""
    original = raw(server, 'GET', '/api/model')[1]['out_dir']
    out_dir = write_checkpoint(tmp_path / 'out-bpe', vocab_size=50304, meta=False)
    assert raw(server, 'POST', '/api/model/load', {'out_dir': out_dir})[0] == 200
    try:
        texts = {}

        def stream(i):
            chunks = client(server).completions.create(model='x', prompt='Hello', max_tokens=40, stream=True,
                                                       temperature=1.5, seed=i)
            texts[i] = ''.join(c.choices[0].text for c in chunks if c.choices)
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(texts) == 8 and all(texts.values())
    finally:
        assert raw(server, 'POST', '/api/model/load', {'out_dir': original})[0] == 200


def test_disconnect_mid_stream_frees_the_row(server):
    before = health(server)
    host, port = server.removeprefix('http://').split(':')
    body = json.dumps({'prompt': 'the', 'max_tokens': MAX_TOKENS_LIMIT, 'stream': True}).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                 b'Content-Length: %d\r\n\r\n' % len(body) + body)
    received = b''
    while received.count(b'data: ') < 5:
        received += sock.recv(4096)
    assert health(server)['active_rows'] == 1
    sock.close()
    deadline = time.time() + 20
    while time.time() < deadline:
        now = health(server)
        if now['active_rows'] == 0:
            break
        time.sleep(0.1)
    assert now['active_rows'] == 0
    assert now['cancelled'] == before['cancelled'] + 1
    assert now['completed'] == before['completed']  # freed, not run to its 4000 tokens


def test_concurrent_streams_are_batched(server):
    c = client(server)
    results = {}

    def stream(i):
        text, usage = '', None
        for chunk in c.completions.create(model='tiny', prompt='the lazy', max_tokens=300, stream=True, seed=i,
                                          stream_options={'include_usage': True}):
            usage = chunk.usage or usage
            text += ''.join(ch.text for ch in chunk.choices)
        results[i] = (text, usage.completion_tokens)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]  # more than max_batch_size
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == list(range(6))
    assert all(len(text) == 300 and tokens == 300 for text, tokens in results.values())
    status = health(server)
    assert status['peak_active_rows'] >= 2 and status['active_rows'] == 0 and status['waiting'] == 0


def test_model_info_and_load(server, tmp_path):
    status, models = raw(server, 'GET', '/v1/models')
    assert status == 200 and models['object'] == 'list' and models['data'][0]['id'] == 'out-tiny'
    assert [m.id for m in client(server).models.list()] == ['out-tiny']
    status, info = raw(server, 'GET', '/api/model')
    assert status == 200
    assert info['iter_num'] == 3 and info['best_val_loss'] == 3.25 and info['tokenizer'] == 'char'
    plain = GPT(GPTConfig(**info['model_args'])).get_num_params()  # the served model's Linears are packed
    assert info['parameters'] == plain and info['model_args']['n_layer'] == 2 and info['config']['dataset'] == 'tiny_chars'
    other = write_checkpoint(tmp_path / 'out-other', iter_num=42, seed=1)
    status, loaded = raw(server, 'POST', '/api/model/load', {'out_dir': other})
    assert status == 200 and loaded['iter_num'] == 42 and loaded['id'] == 'out-other'
    assert raw(server, 'GET', '/api/model')[1]['iter_num'] == 42
    assert len(client(server).completions.create(model='x', prompt='the', max_tokens=7).choices[0].text) == 7
    # and back, for the other tests
    assert raw(server, 'POST', '/api/model/load', {'out_dir': str(info['out_dir'])})[0] == 200


def test_generation_past_the_block_size(server, tmp_path):
    """Learned positions slide their window; rotary and ALiBi models run on past block_size.
    A prompt longer than block_size is cropped by one rule: the server's greedy continuation
    is sample.py's."""
    from textgen import generate_text, load_model
    original = raw(server, 'GET', '/api/model')[1]['out_dir']
    prompt = 'the quick brown fox jumps over the lazy dog'  # 43 characters, block_size 16
    for name, switches in [('out-learned', {}), ('out-rope', {'use_rope': True}), ('out-alibi', {'use_alibi': True})]:
        out_dir = write_checkpoint(tmp_path / name, block_size=16, **switches)
        assert raw(server, 'POST', '/api/model/load', {'out_dir': out_dir})[0] == 200
        r = client(server).completions.create(model='x', prompt=prompt, max_tokens=80, n=2)
        assert [len(ch.text) for ch in r.choices] == [80, 80], name
        greedy = client(server).completions.create(model='x', prompt=prompt, max_tokens=40, temperature=0)
        model, tokenizer, _ = load_model('resume', out_dir)
        local = ''.join(piece for _, piece in generate_text(model, tokenizer, [prompt], 40, temperature=0))
        assert greedy.choices[0].text == local, name
    assert raw(server, 'POST', '/api/model/load', {'out_dir': original})[0] == 200


def test_train_api(server, tmp_path):
    status, configs = raw(server, 'GET', '/api/train/configs')
    assert status == 200 and 'train_shakespeare_char_cpu.py' in configs['configs']
    for name in ['../train.py', 'sub/x.py', '..', '/etc/passwd', 'nonexistent.py', '']:
        status, reply = raw(server, 'POST', '/api/train/start', {'config': name, 'overrides': []})
        assert status == 400 and reply['error']['param'] == 'config', name
    for overrides in [['max_iters=5'], ['--no_such_setting=1'], ['--max_iters=abc'], ['--compile=maybe'],
                      ['--max_iters=5\n--x=1'], ['-- max_iters=5'], [5], 'not a list']:
        status, reply = raw(server, 'POST', '/api/train/start', {'config': 'train_shakespeare_char_cpu.py',
                                                                 'overrides': overrides})
        assert status == 400 and reply['error']['param'] == 'overrides', overrides

    # a run from the page stays in the project: out_dir under train_root, datasets from data/, no weights from a path
    for bad in ['--out_dir=/etc', '--out_dir=' + '../' * 30 + 'x', '--dataset=../../etc', '--dataset=/tmp', '--dataset=nope',
                '--init_from=/etc']:
        status, reply = raw(server, 'POST', '/api/train/start', {'config': 'train_shakespeare_char_cpu.py',
                                                                 'overrides': [bad]})
        assert status == 400 and reply['error']['param'] == 'overrides', (bad, reply)
    with project_dataset() as dataset:
        run_and_stop(server, tiny_run_overrides(dataset, str(tmp_path / 'out-run')))


def run_and_stop(server, overrides):
    status, started = raw(server, 'POST', '/api/train/start', {'config': 'train_shakespeare_char_cpu.py',
                                                               'overrides': overrides})
    assert status == 200 and started['running'], started
    assert raw(server, 'POST', '/api/train/start', {'config': 'train_shakespeare_char_cpu.py',
                                                    'overrides': overrides})[0] == 409  # one run at a time
    log, offset = '', 0
    deadline = time.time() + 90
    while time.time() < deadline and not re.search(r'^step 5: train loss', log, re.M):
        status, reply = raw(server, 'GET', f'/api/train/log?offset={offset}')
        assert status == 200 and reply['run'] == started['run']
        assert reply['offset'] == offset + len(reply['text'].encode())
        log, offset = log + reply['text'], reply['offset']
        assert reply['running'], log
        time.sleep(0.3)
    assert re.search(r'^step 5: train loss [\d.]+, val loss [\d.]+(, val bpb [\d.]+)?$', log, re.M), log
    assert re.search(r'^iter \d+: loss [\d.]+, time', log, re.M), log
    assert log.startswith('$ python train.py config/train_shakespeare_char_cpu.py --dataset=')
    status, stopped = raw(server, 'POST', '/api/train/stop', {})
    assert status == 200 and not stopped['running']
    assert not raw(server, 'GET', '/api/train/status')[1]['running']


def test_api_key_and_sigterm(tmp_path):
    out_dir = write_checkpoint(tmp_path / 'out-key')
    proc, url = start_server(str(tmp_path), out_dir, '--api_key=sekret', f'--max_tokens_limit={MAX_TOKENS_LIMIT}')
    try:
        for path in ['/v1/models', '/api/model', '/api/train/configs']:
            for headers in [{}, {'Authorization': 'Bearer wrong'}, {'Authorization': 'sekret'}]:
                status, reply = raw(url, 'GET', path, b'', headers)
                assert status == 401 and reply['error']['code'] == 'invalid_api_key', (path, headers)
        status, reply = raw(url, 'POST', '/v1/completions', {'prompt': 'a'})
        assert status == 401
        assert raw(url, 'GET', '/health')[0] == 200  # the health check and the page stay open
        assert raw(url, 'GET', '/v1/models', b'', {'Authorization': 'Bearer sekret'})[0] == 200
        with pytest.raises(openai.AuthenticationError):
            client(url, 'wrong').completions.create(model='x', prompt='a', max_tokens=2)
        assert client(url, 'sekret').completions.create(model='x', prompt='a', max_tokens=2).choices[0].text

        # SIGTERM with a stream open: the stream ends, the server exits 0
        stream = client(url, 'sekret').completions.create(model='x', prompt='the', max_tokens=MAX_TOKENS_LIMIT,
                                                          stream=True)
        next(iter(stream))
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match='shutting down'):
            for _ in stream:
                pass
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_fault_in_one_request_fails_only_that_request(tmp_path, monkeypatch):
    """serve.py's worker in this process, with faults injected into one request each while it
    is prefilled, while its decode step runs, while it is sampled and while its text is
    decoded: each of those gets an error, and the healthy requests beside them complete with
    the text they get alone."""
    import engine as engine_module
    from serving.api import Request, read_request
    from serving.worker import Loaded, Worker
    loaded = Loaded('resume', write_checkpoint(tmp_path / 'out-worker'), 'cpu', 'auto')
    ids = {c: CHARS.index(c) for c in 'QZ!?'}
    hidden_states = loaded.model.hidden_states

    def faulty_hidden_states(idx, cache=None):
        if idx.size(1) > 1 and (idx == ids['Q']).any():
            raise RuntimeError("prefill fault")
        if idx.size(1) == 1 and (idx == ids['!']).any():
            raise RuntimeError("step fault")
        return hidden_states(idx, cache)
    sample_tokens = engine_module.sample_tokens

    def faulty_sample_tokens(logits, temperature, *args):
        if (temperature == 0.123).any():
            raise RuntimeError("sampling fault")
        return sample_tokens(logits, temperature, *args)
    token_bytes = loaded.tokenizer.token_bytes

    def faulty_token_bytes(tokens):
        if ids['?'] in tokens:
            raise ValueError("decoding fault")
        return token_bytes(tokens)

    def request(prompt, **body):
        body = dict(dict(max_tokens=30, temperature=0.8, seed=7), **body)
        body['logit_bias'] = {str(i): -100 for i in ids.values()} | body.get('logit_bias', {})
        rows, how = read_request(body, [loaded.tokenizer.encode_prompt(prompt)], loaded.tokenizer, 16, False, 8, 1024)
        return Request(loaded, rows, how['stop'])

    def answer(r):
        texts, done = {}, set()
        while len(done) < len(r.rows[0]):
            event = r.events.get(timeout=60)
            if event[0] == 'error':
                return event[1]
            if event[0] == 'text':
                texts[event[1]] = texts.get(event[1], '') + event[2]
            else:
                done.add(event[1])
        return [texts.get(i, '') for i in range(len(done))]

    def healthy():
        return [request('the lazy dog', n=2), request('a fox', temperature=0), request('quick', max_tokens=50)]

    worker = Worker(loaded, prefix_cache_tokens=4096)
    try:
        expected = [answer(r) for r in [*healthy()] for _ in [worker.submit(r)]]
        monkeypatch.setattr(loaded.model, 'hidden_states', faulty_hidden_states)
        monkeypatch.setattr(engine_module, 'sample_tokens', faulty_sample_tokens)
        monkeypatch.setattr(loaded.tokenizer, 'token_bytes', faulty_token_bytes)
        faulty = [request('the Q fox'), request('the dog!'), request('the fox', temperature=0.123),
                  request('the cat', logit_bias={str(ids['?']): 100})]
        good = healthy()
        for r in [good[0], *faulty[:2], good[1], *faulty[2:], good[2]]:
            worker.submit(r)
        errors = [answer(r) for r in faulty]
        assert [type(e).__name__ for e in errors] == ['APIError'] * 4, errors
        assert all(e.status == 500 for e in errors)
        for e, what in zip(errors, ['prefill fault', 'step fault', 'sampling fault', 'decoding fault']):
            assert what in e.message, e.message
        assert [answer(r) for r in good] == expected
        assert worker.status()['active_rows'] == 0 and worker.status()['failed'] == 4
    finally:
        worker.close()


def reference_logprobs(out_dir, ids):
    """log_softmax of the model's logits at every position of ids, computed directly."""
    from textgen import load_model
    model, _, _ = load_model('resume', out_dir)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]), targets=torch.zeros(1, len(ids), dtype=torch.long))
    return logits[0].log_softmax(-1)


def test_logprobs_echo_and_token_prompts(server):
    out_dir = raw(server, 'GET', '/api/model')[1]['out_dir']
    ids = [CHARS.index(c) for c in 'the lazy']
    c = client(server)
    # generated tokens: their logprobs and top alternatives are the model's log-softmax
    r = c.completions.create(model='x', prompt='the lazy', max_tokens=12, logprobs=3, temperature=0.9, seed=4)
    lp = r.choices[0].logprobs
    generated = [CHARS.index(ch) for ch in r.choices[0].text]
    assert ''.join(lp.tokens) == r.choices[0].text and len(lp.token_logprobs) == 12
    reference = reference_logprobs(out_dir, ids + generated)
    for k, (token, value, top) in enumerate(zip(generated, lp.token_logprobs, lp.top_logprobs)):
        expected = reference[len(ids) - 1 + k]
        assert abs(value - expected[token].item()) < 1e-4
        assert [CHARS.index(t) for t in top] == expected.topk(3).indices.tolist()
        assert all(abs(v - expected[CHARS.index(t)].item()) < 1e-4 for t, v in top.items())
    assert lp.text_offset == list(range(len(ids), len(ids) + 12))
    # echo with max_tokens=0: the scoring call of evaluation harnesses; the first token has no logprob
    r = c.completions.create(model='x', prompt='the lazy', max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == 'the lazy' and lp.tokens == list('the lazy') and lp.text_offset == list(range(8))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    reference = reference_logprobs(out_dir, ids)
    assert all(abs(v - reference[k][ids[k + 1]].item()) < 1e-4 for k, v in enumerate(lp.token_logprobs[1:]))
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == 8
    # the same, streamed: the prompt's chunk then the new tokens' chunks add up to the whole
    chunks = list(c.completions.create(model='x', prompt='the lazy', max_tokens=5, echo=True, logprobs=1, seed=2,
                                       stream=True))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    whole = c.completions.create(model='x', prompt='the lazy', max_tokens=5, echo=True, logprobs=1, seed=2)
    assert streamed == whole.choices[0].logprobs.tokens and ''.join(streamed) == whole.choices[0].text
    # token ids as the prompt, one or several: the same as their text
    by_text = c.completions.create(model='x', prompt=['the lazy', 'dog'], max_tokens=10, temperature=0)
    by_ids = c.completions.create(model='x', prompt=[ids, [CHARS.index(ch) for ch in 'dog']], max_tokens=10,
                                  temperature=0)
    assert [ch.text for ch in by_ids.choices] == [ch.text for ch in by_text.choices]
    assert c.completions.create(model='x', prompt=ids, max_tokens=10, temperature=0).choices[0].text == \
        by_text.choices[0].text
    for bad in [[len(CHARS)], [[1, 2], [-1]], [1, 'a'], [[]]]:
        assert raw(server, 'POST', '/v1/completions', {'prompt': bad})[0] == 400, bad
    for bad in [{'logprobs': 6}, {'logprobs': True}, {'max_tokens': 0}]:
        assert raw(server, 'POST', '/v1/completions', dict(prompt='a', **bad))[0] == 400, bad


def test_chat_logprobs(server):
    r = client(server).chat.completions.create(model='x', messages=[{'role': 'user', 'content': 'the fox?'}],
                                               max_tokens=8, logprobs=True, top_logprobs=4, seed=3)
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= 8
    for entry in content:
        assert len(entry.top_logprobs) == 4 and entry.logprob <= 0 and bytes(entry.bytes).decode() == entry.token
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
    assert ''.join(e.token for e in content).lstrip().startswith(r.choices[0].message.content[:1])
    plain = client(server).chat.completions.create(model='x', messages=[{'role': 'user', 'content': 'hi'}],
                                                   max_tokens=3)
    assert plain.choices[0].logprobs is None
