"""
What continuous batching buys: the aggregate streaming tokens/s of 1 client against that of
`clients` concurrent clients, on a serve.py that this script starts on a free loopback port
and stops again when it is done.

$ python bench_serve.py                                    # GPT-2 (124M) shapes on the CPU
$ python bench_serve.py --clients=16 --max_tokens=256 --device=cuda --dtype=bfloat16
$ python bench_serve.py --out_dir=out-shakespeare-char --prompt=ROMEO:   # a trained model instead
$ LLAMA_SERVER=$(../shared/tools/build-llama-server) python bench_serve.py --compare_llamacpp=True

--compare_llamacpp=True: llama-server (llama.cpp's server, $LLAMA_SERVER or --llama_server) on the GGUF
file export.py writes from the same weights (f16 against our bfloat16, f32 against float32), with
-np <rows> -cb and the same compute threads, back to back with serve.py: aggregate streaming tokens/s and
time to first token (p50, p99) at 1, 8 and 32 clients, then a chat of chat_turns turns that resends its
history each turn (~100 tokens a turn), its time to first token per turn for llama-server (its
cache_prompt on) and for serve.py with and without its prefix cache (the replies, greedy, compared).

Without out_dir the model has random weights: a temporary out_dir gets a checkpoint in
train.py's format and no meta.pkl, so serve.py uses the GPT-2 tokenizer (tiktoken reads its
files from TIKTOKEN_CACHE_DIR, if set, instead of downloading them).
"""
import http.client
import json
import os
import re
import socket
import statistics
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
compare_llamacpp = False  # the side-by-side table against llama-server (timeout then counts per server run)
llama_server = ''  # the llama-server binary; '' = the LLAMA_SERVER environment variable
chat_turns = 10  # turns of the chat part of --compare_llamacpp
repeats = 1  # --compare_llamacpp rounds (serve.py first, then llama-server first, ...): the table shows medians
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


def start_server(model_dir, log_path, deadline, *extra):
    log = open(log_path, 'w')
    command = [sys.executable, os.path.join(HERE, 'serve.py'), f'--out_dir={model_dir}', '--host=127.0.0.1',
               '--port=0', f'--device={device}', f'--dtype={dtype}', f'--max_batch_size={clients}',
               f'--max_tokens_limit={max(max_tokens, 1024)}', f'--threads={threads}', *extra]
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


def stream_one(port, seed, n_tokens, result, text=None, **fields):
    """Stream one completion; record its token count, time to first token, text and end time. fields: more of the
    request's body (what llama-server needs to answer as serve.py does)."""
    t0 = time.time()
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=timeout)
    body = json.dumps({'prompt': prompt if text is None else text, 'max_tokens': n_tokens, 'temperature': 1.0,
                       'seed': seed, 'stream': True, 'stream_options': {'include_usage': True}, **fields})
    conn.request('POST', '/v1/completions', body, {'Content-Type': 'application/json'})
    response = conn.getresponse()
    if response.status != 200:
        result['error'] = f"HTTP {response.status}: {response.read()[:200]!r}"
        return
    first, tokens, pieces = None, 0, []
    for line in response:
        if not line.startswith(b'data: ') or line.strip() == b'data: [DONE]':
            continue
        chunk = json.loads(line[6:])
        if 'error' in chunk:
            result['error'] = chunk['error']['message']
            return
        pieces += [c['text'] for c in chunk['choices']]
        if first is None and any(c['text'] for c in chunk['choices']):
            first = time.time() - t0
        if chunk.get('usage'):
            tokens = chunk['usage']['completion_tokens']
            result['prompt_tokens'] = chunk['usage']['prompt_tokens']
    conn.close()
    result.update(tokens=tokens, first=first or 0.0, end=time.time(), text=''.join(pieces))


def run_clients(port, n, round_seed, deadline, prompts=None, **fields):
    """n clients streaming at once (client i sends prompts[i], else `prompt`): (their results, the seconds until
    the last one ended)."""
    results = [{} for _ in range(n)]
    workers = [threading.Thread(target=stream_one, args=(port, round_seed + i, max_tokens, results[i],
                                                         prompts and prompts[i]), kwargs=fields, daemon=True)
               for i in range(n)]
    t0 = time.time()
    for t in workers:
        t.start()
    for t in workers:
        t.join(max(0.0, deadline - time.time()))
    errors = [r.get('error', 'no answer in time') for r in results if 'end' not in r]
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} clients failed: {errors[0]}")
    return results, max(r['end'] for r in results) - t0


# -----------------------------------------------------------------------------
# --compare_llamacpp: serve.py and llama-server side by side

COUNTS = (1, 8, 32)  # streaming clients at once
LONG = ("The old city stood where two rivers met, and its people had built bridges of stone and wood across both "
        "of them for as long as anyone could remember. Merchants came from the hills with wool and from the coast "
        "with salt and fish, and the market in the square below the cathedral was the busiest in the whole valley. ")
QUESTION = "Tell me more about the old city: who built its bridges, and what did the merchants sell in the market?"
OURS = {'logit_bias': {'50256': -100}, 'top_k': 40}  # never <|endoftext|>: every reply is max_tokens long
LLAMA = {'ignore_eos': True, 'top_k': 40, 'top_p': 1.0, 'min_p': 0.0, 'cache_prompt': True}


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_llama(binary, gguf, log_path, n_threads, deadline):
    port = free_port()
    command = [binary, '-m', gguf, '-t', str(n_threads), '-tb', str(n_threads), '-np', str(max(COUNTS)), '-cb',
               '-c', str(max(COUNTS) * block_size), '--host', '127.0.0.1', '--port', str(port)]
    proc = subprocess.Popen(command, stdout=open(log_path, 'w'), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection('127.0.0.1', port, timeout=5)
            conn.request('GET', '/health')
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        if proc.poll() is not None:
            with open(log_path) as f:
                sys.exit(f"llama-server exited with code {proc.returncode}:\n{f.read()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    sys.exit("llama-server did not start in time")


def stop(proc):
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def load_clients(port, n, fields, deadline):
    """n clients streaming at once, each its own ~200-token prompt: (aggregate tokens/s, TTFT p50, TTFT p99)."""
    results, seconds = run_clients(port, n, 0, deadline, [f"{i}. {LONG * 3}" for i in range(n)], **fields)
    firsts = [r['first'] for r in results]
    return sum(r['tokens'] or max_tokens for r in results) / seconds, percentile(firsts, 0.5), percentile(firsts, 0.99)


def chat(port, fields, deadline):
    """A chat that resends its history each turn (greedy), ~90 tokens a turn with 64-token replies, so that the
    last turn still fits GPT-2's window of 1024: [(time to first token, reply)] per turn."""
    history, turns = "System: You are a helpful assistant who knows the old city well.", []
    for turn in range(chat_turns):
        history += f"\nUser: {turn + 1}. {QUESTION}\nAssistant:"
        result = {}
        stream_one(port, 0, max_tokens, result, history, **dict(fields, temperature=0))
        if 'end' not in result or time.time() > deadline:
            raise RuntimeError(f"chat turn {turn + 1} failed: {result.get('error', 'no answer in time')}")
        turns.append((result['first'], result['text'], result.get('prompt_tokens')))
        history += result['text']
    return turns


def compare(model_dir, what, tmp):
    from common import auto_dtype
    binary = llama_server or os.environ.get('LLAMA_SERVER', '')
    if not (binary and os.access(binary, os.X_OK)):
        sys.exit("--compare_llamacpp needs llama-server: LLAMA_SERVER=$(../shared/tools/build-llama-server) "
                 "python bench_serve.py --compare_llamacpp=True (or --llama_server=PATH)")
    ours_dtype = auto_dtype(device, dtype)
    gguf_dtype = {'float32': 'float32'}.get(ours_dtype, 'float16')  # llama.cpp's nearest to bfloat16 is f16
    gguf = os.path.join(tmp, 'model.gguf')
    exported = subprocess.run([sys.executable, os.path.join(HERE, 'export.py'), f'--out_dir={model_dir}',
                               '--format=gguf', f'--dtype={gguf_dtype}', f'--to={gguf}', '--check=False'],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if exported.returncode:  # export.py's own one-line error (e.g. GPT-2's BPE files unreachable offline)
        last_line = (exported.stderr.strip().splitlines() or ['(no message)'])[-1]
        sys.exit(f"export.py could not write the GGUF file: {last_line}")
    n_threads = threads or max(1, torch.get_num_threads() - 1)  # serve.py's default: one fewer than the cores
    loads = [os.getloadavg()[0]]
    runs = {'ours': [], 'ours, no prefix cache': [], 'llama-server': []}
    for r in range(repeats):  # back to back; every other round llama-server goes first, so a drifting load favours neither
        for name in list(runs)[::-1 if r % 2 else 1]:
            deadline = time.time() + timeout
            if name == 'llama-server':
                proc, port = start_llama(binary, gguf, os.path.join(tmp, 'llama.log'), n_threads, deadline)
                fields = LLAMA
            else:
                proc, port = start_server(model_dir, os.path.join(tmp, 'serve.log'), deadline,
                                          f'--threads={n_threads}', f'--max_batch_size={max(COUNTS)}',
                                          f'--prefix_cache_tokens={0 if "no prefix" in name else 4096}')
                fields = OURS
            try:
                stream_one(port, 0, 8, {}, **fields)  # warm up
                loads_by_count = [] if 'no prefix' in name else [load_clients(port, n, fields, deadline) for n in COUNTS]
                runs[name].append((loads_by_count, chat(port, fields, deadline)))
            finally:
                stop(proc)
            loads.append(os.getloadavg()[0])
    median = lambda values: statistics.median(values)  # noqa: E731
    print(f"serve.py ({ours_dtype}) against llama-server (GGUF {gguf_dtype}): {what}, {device}, {n_threads} compute "
          f"thread(s) each, {max_tokens} tokens a client, ~200-token prompts; median of {repeats} round(s); "
          f"1-minute load average {min(loads):.1f}-{max(loads):.1f}")
    heads = ' | '.join(f"{n} client{'s' * (n > 1)}" for n in COUNTS)
    print(f"\n| | {heads} |\n|---|{'---|' * len(COUNTS)}")
    for name in ('ours', 'llama-server'):
        cells = [median([r[0][i][0] for r in runs[name]]) for i in range(len(COUNTS))]
        print(f"| {name}: aggregate tok/s | {' | '.join(f'{c:.1f}' for c in cells)} |")
    for name in ('ours', 'llama-server'):
        cells = [(median([r[0][i][1] for r in runs[name]]), median([r[0][i][2] for r in runs[name]]))
                 for i in range(len(COUNTS))]
        print(f"| {name}: TTFT p50 / p99 ms | {' | '.join(f'{a * 1e3:.0f} / {b * 1e3:.0f}' for a, b in cells)} |")
    print(f"\n| chat, TTFT ms, turn | {' | '.join(str(t + 1) for t in range(chat_turns))} |\n|---|{'---|' * chat_turns}")
    for name in runs:
        cells = [median([r[1][t][0] for r in runs[name]]) for t in range(chat_turns)]
        print(f"| {name} | {' | '.join(f'{c * 1e3:.0f}' for c in cells)} |")
    same = [a[1] == b[1] for r, s in zip(runs['ours'], runs['ours, no prefix cache']) for a, b in zip(r[1], s[1])]
    last = lambda name: median([r[1][-1][0] for r in runs[name]])  # noqa: E731
    final = runs['ours'][0][1][-1][2]
    print(f"\nturn {chat_turns}'s prompt: {final} tokens; replies identical with and without the prefix cache: "
          f"{sum(same)} of {len(same)}; turn {chat_turns}: "
          f"the cache {last('ours, no prefix cache') / last('ours'):.1f}x faster than without; time to first token "
          f"{last('ours') * 1e3:.0f} ms, llama-server's {last('llama-server') * 1e3:.0f} ms")


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
        if compare_llamacpp:
            return compare(model_dir, what, tmp)
        proc, port = start_server(model_dir, os.path.join(tmp, 'serve.log'), deadline)
        print(f"serve.py on 127.0.0.1:{port}: {what}, {device} {dtype}"
              f"{f', {threads} threads' if threads else ''}, {max_tokens} tokens per client")
        run_clients(port, 1, 0, deadline)  # warm up: first-call allocations and lazy initialisation
        rows = []
        for n in (1, clients):
            results, seconds = run_clients(port, n, 1000 * n, deadline)
            rows.append((n, sum(r['tokens'] for r in results), seconds, sum(r['first'] for r in results) / n))
        print(f"{'clients':>7} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'per client':>11} {'first token':>12}")
        for n, tokens, seconds, first in rows:
            print(f"{n:>7} {tokens:>7} {seconds:>8.2f} {tokens / seconds:>9.1f} {tokens / seconds / n:>11.1f} "
                  f"{first:>11.2f}s")
        (_, t1, s1, _), (n, tn, sn, _) = rows
        print(f"{n} concurrent clients get {(tn / sn) / (t1 / s1):.2f}x the aggregate tokens/s of 1")
    finally:
        stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
