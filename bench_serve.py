"""
What continuous batching buys: the aggregate streaming tokens/s of 1 client against that of
`clients` concurrent clients, on a serve.py that this script starts on a free loopback port
and stops again when it is done.

$ python bench_serve.py                                    # GPT-2 (124M) shapes on the CPU
$ python bench_serve.py --clients=16 --max_tokens=256 --device=cuda --dtype=bfloat16
$ python bench_serve.py --out_dir=out-shakespeare-char --prompt=ROMEO:   # a trained model instead

Without out_dir the model has random weights: a temporary out_dir gets a checkpoint in
train.py's format and no meta.pkl, so serve.py uses the GPT-2 tokenizer (tiktoken reads its
files from TIKTOKEN_CACHE_DIR, if set, instead of downloading them).
"""
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import torch

from configurator import configure
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
out_dir = ''  # a trained checkpoint to serve; '' = random weights with the shapes below
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
vocab_size = 50304  # GPT-2's tokenizer, padded as train.py pads it
clients = 8  # concurrent clients in the second run (and serve.py's max_batch_size)
max_tokens = 64  # tokens each client streams
prompt = "The meaning of life is"
device = 'cpu'
dtype = 'auto'  # as serve.py: bfloat16 where the CPU or GPU computes it natively, else float32
threads = 0  # serve.py's --threads (CPU threads of the model); 0 = its default, one fewer than the cores
timeout = 600  # seconds: the whole benchmark gives up after this long
# -----------------------------------------------------------------------------
if __name__ == '__main__':
    configure(globals())  # before the constants below, so --help and overrides see only the settings above

HERE = os.path.dirname(os.path.abspath(__file__))


def random_checkpoint(folder):
    model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=False,
                      vocab_size=vocab_size, dropout=0.0)
    model = GPT(GPTConfig(**model_args))
    torch.save({'model': model.state_dict(), 'optimizer': {}, 'model_args': model_args, 'iter_num': 0,
                'best_val_loss': float('nan'), 'config': {}}, os.path.join(folder, 'ckpt.pt'))
    return model.get_num_params()


def start_server(model_dir, log_path, deadline):
    log = open(log_path, 'w')
    command = [sys.executable, os.path.join(HERE, 'serve.py'), f'--out_dir={model_dir}', '--host=127.0.0.1',
               '--port=0', f'--device={device}', f'--dtype={dtype}', f'--max_batch_size={clients}',
               f'--max_tokens_limit={max(max_tokens, 1024)}', f'--threads={threads}']
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    proc = subprocess.Popen(command, cwd=HERE, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    while time.time() < deadline:
        with open(log_path) as f:
            text = f.read()
        match = re.search(r'serving .* on http://127\.0\.0\.1:(\d+)', text)
        if match:
            return proc, int(match.group(1))
        if proc.poll() is not None:
            sys.exit(f"serve.py exited with code {proc.returncode}:\n{text}")
        time.sleep(0.2)
    proc.kill()
    sys.exit("serve.py did not start in time")


def stream_one(port, seed, n_tokens, result):
    """Stream one completion; record its token count, time to first token and end time."""
    t0 = time.time()
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=timeout)
    body = json.dumps({'prompt': prompt, 'max_tokens': n_tokens, 'temperature': 1.0, 'seed': seed, 'stream': True,
                       'stream_options': {'include_usage': True}})
    conn.request('POST', '/v1/completions', body, {'Content-Type': 'application/json'})
    response = conn.getresponse()
    if response.status != 200:
        result['error'] = f"HTTP {response.status}: {response.read()[:200]!r}"
        return
    first, tokens = None, 0
    for line in response:
        if not line.startswith(b'data: ') or line.strip() == b'data: [DONE]':
            continue
        chunk = json.loads(line[6:])
        if 'error' in chunk:
            result['error'] = chunk['error']['message']
            return
        if first is None and any(c['text'] for c in chunk['choices']):
            first = time.time() - t0
        if chunk.get('usage'):
            tokens = chunk['usage']['completion_tokens']
    conn.close()
    result.update(tokens=tokens, first=first or 0.0, end=time.time())


def run_clients(port, n, round_seed, deadline):
    """n clients streaming at once: (tokens, seconds, mean time to first token)."""
    results = [{} for _ in range(n)]
    workers = [threading.Thread(target=stream_one, args=(port, round_seed + i, max_tokens, results[i]), daemon=True)
               for i in range(n)]
    t0 = time.time()
    for t in workers:
        t.start()
    for t in workers:
        t.join(max(0.0, deadline - time.time()))
    errors = [r.get('error', 'no answer in time') for r in results if 'end' not in r]
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} clients failed: {errors[0]}")
    seconds = max(r['end'] for r in results) - t0
    return sum(r['tokens'] for r in results), seconds, sum(r['first'] for r in results) / n


def main():
    deadline = time.time() + timeout
    tmp = tempfile.mkdtemp(prefix='bench-serve-')
    proc = None
    try:
        if out_dir:
            model_dir, what = out_dir, out_dir
        else:
            torch.manual_seed(1337)
            n_params = random_checkpoint(tmp)
            model_dir, what = tmp, f"random weights, {n_params / 1e6:.2f}M parameters ({n_layer}x{n_embd})"
        proc, port = start_server(model_dir, os.path.join(tmp, 'serve.log'), deadline)
        print(f"serve.py on 127.0.0.1:{port}: {what}, {device} {dtype}"
              f"{f', {threads} threads' if threads else ''}, {max_tokens} tokens per client")
        run_clients(port, 1, 0, deadline)  # warm up: first-call allocations and lazy initialisation
        rows = []
        for n in (1, clients):
            tokens, seconds, first = run_clients(port, n, 1000 * n, deadline)
            rows.append((n, tokens, seconds, first))
        print(f"{'clients':>7} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'per client':>11} {'first token':>12}")
        for n, tokens, seconds, first in rows:
            print(f"{n:>7} {tokens:>7} {seconds:>8.2f} {tokens / seconds:>9.1f} {tokens / seconds / n:>11.1f} "
                  f"{first:>11.2f}s")
        (_, t1, s1, _), (n, tn, sn, _) = rows
        print(f"{n} concurrent clients get {(tn / sn) / (t1 / s1):.2f}x the aggregate tokens/s of 1")
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
