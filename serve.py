"""
Serve a model over HTTP: an OpenAI-style API (completions and chat, streamed or not) and a
small web page to generate, chat, train and inspect the model. Standard library only.

$ python serve.py --out_dir=out-shakespeare-char --port=8080
$ python serve.py --init_from=gpt2 --api_key=secret   # clients then send "Authorization: Bearer secret"

then open http://127.0.0.1:8080, or point any OpenAI client at http://127.0.0.1:8080/v1.
Besides completions and chat (response_format for JSON output, best_of on completions), as llama-server:
POST /tokenize, POST /detokenize, POST /v1/embeddings, GET /metrics (Prometheus), GET /health (503 while
the model loads).
One worker thread owns the model and drives the decode engine (engine.py): a request waits in
a queue for free rows, joins the running batch between two steps and leaves it when it ends.
"""
import base64
import bisect
import hmac
import json
import math
import os
import queue
import re
import select
import struct
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from configurator import check_value, configure, settings_in
from engine import Engine, Row, SettingError, beam_rows, embed
from grammar import FormatError, json_grammar
from model import GPTConfig, auto_dtype, training_memory
from sample import decode_step, load_model, set_threads, start_reply, stop_tokens_of
from tokenizer import CHAT_ROLES, read_meta, render_chat, reply_content

# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (from out_dir), a gpt2 variant ('gpt2', 'gpt2-xl'), or a local transformers directory
out_dir = 'out'  # ignored unless init_from is 'resume'
host = '127.0.0.1'  # '0.0.0.0' listens on all interfaces: set api_key too
port = 8080  # 0 picks a free port (the line "serving ... on http://host:port" says which)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'auto'  # bfloat16 where the GPU or CPU computes it natively, else float32 (float16 on older GPUs); or name one
quantize = ''  # 'int8': int8 weights with a scale per row in every Linear (on a CPU: faster at batch 1, slower at 8)
max_batch_size = 8  # rows of the engine: requests (times n) decoded together
max_tokens_limit = 1024  # the largest max_tokens a request may ask for
max_waiting = 256  # prompts queued for a free row; past that, new requests get 429
max_body_bytes = 1_000_000  # larger request bodies get 413
request_timeout = 30  # seconds a client has to send a whole request
api_key = ''  # when set, /v1 and /api routes need "Authorization: Bearer <api_key>"
train_root = ''  # the page's training runs write under here, and /api/model/load reads from here or out_dir ('' = this project's folder)
seed = 1337  # the random stream of requests that bring no seed of their own
threads = 0  # CPU threads the model computes on; 0: one fewer than torch's default, which leaves the HTTP threads a core
# keys and values of ended sequences kept for prompts that start the same way (a chat's next turn); 0 = off.
# Memory: n_layer * 2 * n_embd * 4 bytes a token (GPT-2 124M: 74 KB, so 4096 tokens take 300 MB)
prefix_cache_tokens = 4096
# -----------------------------------------------------------------------------
if __name__ == '__main__':
    configure(globals())  # before the constants below, so --help and overrides see only the settings above

HERE = os.path.dirname(os.path.abspath(__file__))  # templates/, config/, data/ and train.py live here
MAX_STOP = 4  # stop strings a request may give, as OpenAI's API
DRAIN_BYTES = 64 << 20  # of a body over max_body_bytes, read this much before the 413 (within request_timeout)
# the page's icon: browsers ask for /favicon.ico on every page, and log a 404 without one
FAVICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="7" '
           b'fill="#2563eb"/><text x="16" y="23" font-family="sans-serif" font-size="20" font-weight="700" '
           b'fill="#fff" text-anchor="middle">n</text></svg>')


class APIError(Exception):
    """Anything that ends a request with an error status, in OpenAI's error shape."""

    def __init__(self, message, param=None, status=400, code=None, kind='invalid_request_error'):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self):
        return {'error': {'message': self.message, 'type': self.kind, 'param': self.param, 'code': self.code}}


def require(ok, message, param=None, status=400, code=None):
    """One check of a request: unless ok, it ends with `status`, naming the field at fault."""
    if not ok:
        raise APIError(message, param, status, code)


def server_error(message, code=None, status=500):
    return APIError(message, status=status, kind='server_error', code=code)


WORKER_STOPPED = server_error("the model worker has stopped after an internal error (see the server's log); "
                              "restart the server", 'worker_stopped', 503)


class Loaded:
    """A model with its tokenizer and where it came from. A reload replaces the whole object."""

    def __init__(self, init_from, out_dir):
        self.model, self.tokenizer, self.info = load_model(init_from, out_dir, device, dtype, quantize)
        self.init_from, self.out_dir, self.created = init_from, out_dir, int(time.time())
        self.name = os.path.basename(os.path.abspath(out_dir)) if init_from == 'resume' else init_from

    def describe(self):
        cfg = self.model.config
        best = self.info.get('best_val_loss')  # a tensor in nanoGPT's checkpoints; JSON has no NaN
        best = float(best) if best is not None and math.isfinite(float(best)) else None
        return {'id': self.name, 'source': self.info.get('source'), 'init_from': self.init_from,
                'out_dir': self.out_dir if self.init_from == 'resume' else None,
                'parameters': self.info['parameters'], 'model_args': vars(cfg), 'config': self.info.get('config'),
                'iter_num': self.info.get('iter_num'), 'best_val_loss': best, 'tokenizer': self.tokenizer.name,
                'vocab_size': cfg.vocab_size, 'block_size': cfg.block_size, 'device': device, 'dtype': dtype,
                'quantize': quantize or None,
                # a chat model (its tokenizer renders turns): the page opens on its Chat tab
                'chat': '<|assistant_start|>' in self.tokenizer.special_tokens}


# -----------------------------------------------------------------------------
# GET /metrics: Prometheus' text format, written by hand (no client library needed for a few counters)

class Metrics:
    """Counters by name and labels, and histograms of seconds; HTTP threads and the worker add to them."""
    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
    HELP = {
        'nanogpt_requests_total': ('counter', "HTTP requests answered, by route and status"),
        'nanogpt_prompt_tokens_total': ('counter', "prompt tokens of the requests that started generating"),
        'nanogpt_prompt_tokens_cached_total': ('counter', "of those, tokens whose keys and values came from the prefix cache"),
        'nanogpt_generated_tokens_total': ('counter', "tokens generated"),
        'nanogpt_time_to_first_token_seconds': ('histogram', "from a request's arrival to each choice's first token"),
        'nanogpt_inter_token_latency_seconds': ('histogram', "between two tokens of a choice"),
    }

    def __init__(self):
        self.lock = threading.Lock()
        self.counters = {}  # (name, ((label, value), ...)) -> count
        self.histograms = {}  # name -> [count per bucket (and +Inf), sum]

    def add(self, name, value=1, **labels):
        key = (name, tuple(sorted(labels.items())))
        with self.lock:
            self.counters[key] = self.counters.get(key, 0) + value

    def observe(self, name, seconds):
        with self.lock:
            h = self.histograms.setdefault(name, [0] * (len(self.BUCKETS) + 1) + [0.0])
            h[bisect.bisect_left(self.BUCKETS, seconds)] += 1
            h[-1] += seconds

    def text(self, gauges):
        """The exposition text: every counter and histogram, then the gauges given ({name: (help, value)})."""
        lines = []
        with self.lock:
            for name, (kind, help_text) in self.HELP.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                if kind == 'counter':
                    rows = [(labels, v) for (n, labels), v in sorted(self.counters.items()) if n == name] or [((), 0)]
                    lines += [f"{name}{label_text(labels)} {v}" for labels, v in rows]
                    continue
                h = self.histograms.get(name, [0] * (len(self.BUCKETS) + 1) + [0.0])
                for i, le in enumerate([*map(str, self.BUCKETS), '+Inf']):
                    lines.append(f'{name}_bucket{{le="{le}"}} {sum(h[:i + 1])}')
                lines += [f"{name}_sum {h[-1]:.6f}", f"{name}_count {sum(h[:-1])}"]
        for name, (help_text, value) in gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
        return ('\n'.join(lines) + '\n').encode()


def label_text(labels):
    return '{' + ','.join(f'{k}="{v}"' for k, v in labels) + '}' if labels else ''


metrics = Metrics()
worker = None  # the Worker, once the model has loaded (main): until then every route answers 503


def gauges():
    status = worker.status()
    return {'nanogpt_requests_waiting': ("prompts queued for a free row", status['waiting']),
            'nanogpt_rows_running': ("engine rows generating", status['active_rows']),
            'nanogpt_prefix_cache_tokens': ("tokens the prefix cache holds", status['prefix_cache_tokens'])}


# -----------------------------------------------------------------------------
# The queue and the worker thread that owns the model

class Request:
    """One API call: rows[i] are the n engine rows (the "choices") of prompt i, made and checked by the HTTP
    thread for the model `loaded`. The worker reports through `events`: with echo first ('prompt', choice,
    logprobs of the prompt's tokens), then ('text', choice, piece, logprobs) and ('done', choice, finish_reason,
    n_tokens), or ('error', APIError). logprobs: [(token, logprob, [(id, logprob) of the top alternatives])]."""

    def __init__(self, loaded, rows, stop, echo=False):
        self.loaded, self.rows, self.stop, self.echo = loaded, rows, stop, echo
        self.events = queue.Queue()
        self.cancelled = False  # set by the HTTP thread when its client has gone
        self.failed = False  # it got its error: its prompts still waiting are dropped
        self.arrived = time.time()  # for the time-to-first-token histogram


class Worker:
    """The engine's rows carry their request: row.request, row.choice and row.text (its TextStream)."""

    def __init__(self, loaded):
        self.cond = threading.Condition()  # guards waiting, pending_load and closing
        self.waiting = deque()  # (request, prompt index)
        self.pending_load, self.closing = None, False
        self.stats = dict(peak_active_rows=0, steps=0, generated_tokens=0, completed=0, cancelled=0, failed=0,
                          restarts=0)
        self.use(loaded)
        self.thread = threading.Thread(target=self.run, name='model-worker')
        self.thread.start()

    def use(self, loaded):
        engine = Engine(loaded.model, max_batch_size, max_tokens_limit, loaded.tokenizer.n_vocab, seed,
                        prefix_cache_tokens=prefix_cache_tokens)
        self.loaded, self.engine = loaded, engine

    def submit(self, request=None, load=None):
        """Queue a request (from an HTTP thread), or with load=(Loaded, Event) switch models."""
        with self.cond:
            if self.closing:
                raise server_error("the server is shutting down", 'shutting_down', 503)
            if not self.alive():
                raise WORKER_STOPPED
            if load:
                self.pending_load = load
            elif len(self.waiting) + len(request.rows) > max_waiting:
                raise APIError("too many requests are waiting; try again later", status=429, code='busy',
                               kind='rate_limit_error')
            else:
                self.waiting.extend((request, i) for i in range(len(request.rows)))
            self.cond.notify()

    def status(self):
        return dict(self.stats, active_rows=len(self.engine.rows), waiting=len(self.waiting),
                    max_batch_size=max_batch_size, prefix_cache_tokens=self.engine.prefix_tokens_held())

    def close(self):
        """Stop after the current step; every open request ends with an error."""
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.thread.join()
        if self.pending_load:
            self.pending_load[1].set()  # a load that came too late: let its HTTP thread finish
        self.fail_all(server_error("the server is shutting down", 'shutting_down', 503))

    def run(self):
        """Admit and step until closed. A fault outside any one request (a bug) fails the requests
        the worker held and it goes on with a fresh engine; should even that fail, the thread ends,
        and /health and every waiting request say so (see alive)."""
        while True:
            with self.cond:
                while not (self.engine.rows or self.waiting or self.pending_load or self.closing):
                    self.cond.wait()
                if self.closing:
                    return
                load, self.pending_load = self.pending_load, None
            try:
                if load:
                    try:
                        self.fail_all(server_error("the model was replaced while this request ran", 'model_replaced',
                                                   503))
                        self.use(load[0])
                    finally:
                        load[1].set()  # its HTTP thread checks whether the switch happened
                self.admit()
                self.step()
            except Exception:
                traceback.print_exc()
                self.stats['restarts'] += 1
                held = self.engine.rows
                self.use(self.loaded)  # the old engine may be in any state: none of its rows is touched again
                self.fail_all(server_error("internal error while generating"), held)

    def alive(self):
        return self.thread.is_alive() or self.closing

    def fail_all(self, error, rows=None):
        """Fail every waiting request and those of `rows` (default: the engine's)."""
        with self.cond:
            requests = {r for r, _ in self.waiting} | {row.request for row in (self.engine.rows if rows is None else rows)}
            self.waiting.clear()
        for request in requests:
            self.fail(request, error)

    def fail(self, request, error):
        """End one request with an error; its other rows leave the engine too."""
        for row in [row for row in self.engine.rows if row.request is request]:
            self.engine.finish(row, 'error')
        if not request.failed:
            request.failed = True
            self.stats['failed'] += 1
            request.events.put(('error', error))

    def admit(self):
        """Prefill waiting prompts while there are free rows; first come, first served."""
        while True:
            with self.cond:
                while self.waiting and (self.waiting[0][0].cancelled or self.waiting[0][0].failed):
                    dropped = self.waiting.popleft()[0]
                    self.stats['cancelled'] += len(dropped.rows[0]) if not dropped.failed else 0
                if not self.waiting or len(self.waiting[0][0].rows[0]) > max_batch_size - len(self.engine.rows):
                    return
                request, i = self.waiting.popleft()
            rows = request.rows[i]
            for j, row in enumerate(rows):
                row.request, row.choice = request, i * len(rows) + j
            try:  # whatever goes wrong here ends this request, never the worker
                for row in rows:  # its text, and its calculator if the model has one
                    start_reply(row, self.loaded.tokenizer, request.stop)
                if request.loaded is not self.loaded:  # tokenized for a model that is gone
                    raise server_error("the model was replaced; send the request again", 'model_replaced', 503)
                if request.echo:  # the prompt comes first, its tokens scored when logprobs were asked for
                    prompt, top = rows[0].prompt, rows[0].logprobs
                    scored = [] if top is None else self.engine.prompt_logprobs(prompt, top)
                    entries = [(t, *(e or (None, None))) for t, e in zip(prompt, scored)]
                    for row in rows:
                        request.events.put(('prompt', row.choice, entries))
                if rows[0].max_tokens == 0:  # only the prompt was asked for
                    for row in rows:
                        request.events.put(('done', row.choice, 'length', 0))
                else:
                    self.engine.add(rows)
                    metrics.add('nanogpt_prompt_tokens_total', len(rows[0].prompt))
                    metrics.add('nanogpt_prompt_tokens_cached_total', rows[0].cached_tokens)
            except APIError as e:
                self.fail(request, e)
            except SettingError as e:
                self.fail(request, APIError(str(e), e.name))
            except Exception as e:  # this request's fault (a prompt the model cannot take): it alone fails
                traceback.print_exc()
                self.fail(request, server_error(f"could not start generating: {type(e).__name__}: {e}"))
            self.stats['peak_active_rows'] = max(self.stats['peak_active_rows'], len(self.engine.rows))

    def step(self):
        for row in [row for row in self.engine.rows if row.request.cancelled]:
            self.engine.finish(row, 'cancelled')
            self.stats['cancelled'] += 1
        self.stats['steps'] += bool(self.engine.rows)
        failed = set()  # requests failed in this step: their other rows have left the engine
        for row, piece in decode_step(self.engine):
            request = row.request
            if request in failed:
                continue
            if row.error is not None:  # a fault in one row: its request alone fails
                self.fail(request, server_error(f"error while generating: {type(row.error).__name__}: {row.error}"))
                failed.add(request)
                continue
            self.stats['generated_tokens'] += 1
            metrics.add('nanogpt_generated_tokens_total')
            now, last = time.time(), getattr(row, 'last_token_at', None)
            if last is None:
                metrics.observe('nanogpt_time_to_first_token_seconds', now - request.arrived)
            else:
                metrics.observe('nanogpt_inter_token_latency_seconds', now - last)
            row.last_token_at = now
            token = row.tokens[-1]
            # a calculator's output is forced, not sampled: no logprobs of its own
            scored = row.logprobs is not None and token not in row.stop_tokens and (not row.sampled or row.sampled[-1])
            logprobs = [(token, *row.token_logprobs[-1])] if scored else []
            if piece or logprobs:
                request.events.put(('text', row.choice, piece, logprobs))
            if row.finish_reason:
                reason = 'stop' if row.finish_reason == 'stop' else 'length'
                request.events.put(('done', row.choice, reason, len(row.tokens)))
                self.stats['completed'] += 1


# -----------------------------------------------------------------------------
# Training runs started from the page: train.py as a subprocess, one at a time

def is_under(path, root):
    """Whether `path` (relative to the working directory) is `root` or inside it, links resolved."""
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def check_override(arg, settings):
    """--key=value for a known setting, of the setting's type; and a run from the page stays in the project:
    its out_dir under train_root, its dataset a folder of data/, no weights from a path."""
    match = re.fullmatch(r'--([A-Za-z_]\w*)=(.*)', arg) if isinstance(arg, str) else None
    require(match, f"override {arg!r} is not of the form --key=value", 'overrides')
    try:
        key, value = match.group(1), check_value(settings, *match.groups())
    except ValueError as e:
        raise APIError(str(e), 'overrides')
    root = os.path.realpath(train_root or HERE)
    require(key != 'out_dir' or is_under(os.path.join(root, value), root), f"out_dir must be a folder under {root}",
            'overrides')
    require(key != 'dataset' or re.fullmatch(r'\w[\w.-]*', value) and os.path.isdir(os.path.join(HERE, 'data', value)),
            f"dataset must be the name of a folder in data/, not {value!r}", 'overrides')
    require(key != 'init_from' or re.fullmatch(r'scratch|resume|gpt2(-medium|-large|-xl)?', value),
            "init_from must be 'scratch', 'resume' or a GPT-2 name", 'overrides')


def resolved_settings(argv):
    """train.py's settings once a config file and overrides apply, as train.py will see them. A config file
    is Python that may exec another by a path relative to the project: worked out in a child process there."""
    code = ("import json, sys; from configurator import configure, settings_in; s = settings_in('train.py'); "
            "configure(s, sys.argv[1:]); print(); print(json.dumps(s))")
    try:
        child = subprocess.run([sys.executable, '-c', code, *argv], cwd=HERE, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise APIError("the config file did not finish within 60 seconds", 'config')
    require(child.returncode == 0, f"the config does not apply: {(child.stderr.strip().splitlines() or ['?'])[-1]}",
            'config')
    return json.loads(child.stdout.strip().splitlines()[-1])


GPT2_SHAPES = {'gpt2': (12, 12, 768), 'gpt2-medium': (24, 16, 1024), 'gpt2-large': (36, 20, 1280),
               'gpt2-xl': (48, 25, 1600)}  # (n_layer, n_head, n_embd) of OpenAI's checkpoints


def check_training_memory(values):
    """A 400 with the estimate when the run's model could not train in the memory this machine has free."""
    arch = {k: values[k] for k in GPTConfig.__dataclass_fields__ if k in values}
    meta_path = os.path.join(HERE, 'data', values['dataset'], 'meta.pkl')
    try:
        meta = read_meta(meta_path) if os.path.exists(meta_path) else {}
    except ValueError as e:
        raise APIError(str(e), 'overrides')
    arch['vocab_size'] = meta['vocab_size'] if 'vocab_size' in meta and meta.get('tokenizer') != 'gpt2' else 50304
    if values['init_from'] in GPT2_SHAPES:
        arch.update(zip(('n_layer', 'n_head', 'n_embd'), GPT2_SHAPES[values['init_from']]), bias=True, n_kv_head=0,
                    block_size=min(values['block_size'], 1024))
    try:
        need = training_memory(GPTConfig(**arch), values['batch_size'])
    except (AssertionError, TypeError, ValueError) as e:
        raise APIError(f"invalid model settings: {e}", 'overrides')
    device = values['device']
    if device.startswith('cuda') and torch.cuda.is_available():
        free, where = torch.cuda.mem_get_info(torch.device(device))[0], 'on the GPU'
    else:
        free, where = available_memory(), 'in RAM'
    require(need <= free, f"this run would need about {need / 1e9:.1f} GB to train (weights, gradients, AdamW's state and "
            f"the activations of batch_size={values['batch_size']}); {free / 1e9:.1f} GB is free {where}: choose a "
            f"smaller model or batch", 'overrides', code='too_large')


def available_memory():
    """Bytes of memory free for a new process (Linux's MemAvailable; elsewhere all of it)."""
    try:
        with open('/proc/meminfo') as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:'))
    except (OSError, StopIteration, ValueError):
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


class TrainRun:
    """At most one train.py subprocess. Its stdout and stderr go to a log file, which the page reads piece by piece."""

    def __init__(self):
        self.lock = threading.Lock()
        self.proc = self.run_id = self.log_path = self.command = self.started = None

    def configs(self):
        names = os.listdir(os.path.join(HERE, 'config'))
        return sorted(f for f in names if f.endswith('.py') and not f.startswith('_'))

    def start(self, config_name, overrides):
        require(isinstance(config_name, str) and config_name in self.configs(),
                f"'config' must name a file in config/, not {config_name!r}", 'config')
        require(isinstance(overrides, list) and len(overrides) <= 100,
                "'overrides' must be a list of --key=value strings", 'overrides')
        settings = settings_in(os.path.join(HERE, 'train.py'))
        for arg in overrides:
            check_override(arg, settings)
        argv = [os.path.join('config', config_name), *overrides]
        values = resolved_settings(argv)
        # whatever the config file says, the run writes under root: its out_dir is taken from there
        root = os.path.realpath(train_root or HERE)
        run_dir = os.path.realpath(os.path.join(root, values['out_dir']))
        require(is_under(run_dir, root), f"the config's out_dir {values['out_dir']!r} is not under {root}: set --out_dir",
                'overrides')
        check_training_memory(values)
        with self.lock:
            require(self.proc is None or self.proc.poll() is not None,
                    "a training run is already running; stop it first", status=409, code='busy')
            self.remove_log()
            # an argument list, never a shell: the overrides reach train.py exactly as written
            self.command = [sys.executable, 'train.py', *argv, f'--out_dir={run_dir}']
            with tempfile.NamedTemporaryFile('wb', prefix='nanogpt-train-', suffix='.log', delete=False) as log:
                log.write(('$ python ' + ' '.join(self.command[1:]) + '\n').encode())
                log.flush()
                # its own session: a Ctrl-C meant for the server does not hit the run directly
                self.proc = subprocess.Popen(self.command, cwd=HERE, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True,
                                             env=dict(os.environ, PYTHONUNBUFFERED='1'))
            self.log_path, self.run_id, self.started = log.name, uuid.uuid4().hex[:12], time.time()
        return self.status()

    def stop(self):
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        return self.status()

    def remove_log(self):
        if self.log_path and os.path.exists(self.log_path):
            os.remove(self.log_path)

    def status(self):
        if self.proc is None:
            return {'run': None, 'running': False}
        return {'run': self.run_id, 'running': self.proc.poll() is None, 'returncode': self.proc.returncode,
                'command': ['python', *self.command[1:]], 'log_file': self.log_path, 'started': self.started}

    def read_log(self, offset, limit=1 << 16):
        """Log text from byte `offset` on. While the run goes on, only whole lines."""
        require(offset.isdigit(), "'offset' must be a non-negative integer", 'offset')
        offset, status = int(offset), self.status()
        if self.proc is None:
            return dict(status, text='', offset=0)
        with open(self.log_path, 'rb') as f:
            f.seek(offset)
            data = f.read(limit)
        if status['running'] and b'\n' in data:
            data = data[:data.rfind(b'\n') + 1]
        return dict(status, text=data.decode('utf-8', errors='replace'), offset=offset + len(data))


# -----------------------------------------------------------------------------
# Reading the requests, and OpenAI's shape of the answers

ROW_SETTINGS = ('max_tokens', 'temperature', 'top_p', 'top_k', 'repetition_penalty', 'presence_penalty',
                'frequency_penalty', 'seed', 'logit_bias')


def flag(body, name):
    require(body.get(name) in (None, True, False), f"'{name}' must be true or false, not {body.get(name)!r}", name)
    return bool(body.get(name))


def read_json(body):
    try:
        value = json.loads(body.decode('utf-8'), parse_constant=refuse_constant)
    except UnicodeDecodeError:
        raise APIError("the body is not valid UTF-8")
    except (ValueError, RecursionError) as e:
        raise APIError(f"the body is not valid JSON: {e}")
    require(isinstance(value, dict), "the body must be a JSON object")
    return value


def refuse_constant(name):
    # Python's json reads NaN and Infinity, which are not JSON: refuse them rather than sample with them
    raise ValueError(f"{name} is not a JSON number")


def chat_messages(messages):
    """[(role, content), ...] from OpenAI's messages; a 400 naming the message that is wrong."""
    require(isinstance(messages, list) and messages, "'messages' must be a non-empty list", 'messages')
    out = []
    for i, m in enumerate(messages):
        require(isinstance(m, dict) and m.get('role') in CHAT_ROLES,
                f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}", f'messages[{i}].role')
        content = m.get('content')
        if isinstance(content, list) and content and all(isinstance(p, dict) and p.get('type') == 'text'
                                                         and isinstance(p.get('text'), str) for p in content):
            content = ''.join(p['text'] for p in content)  # the list form: [{"type": "text", "text": "..."}]
        require(isinstance(content, str), f"messages[{i}].content must be a string or a list of text parts",
                f'messages[{i}].content')
        # a reply this server wrote shows its calculator calls as text: they render as the model wrote them
        out.append((m['role'], reply_content(content) if m['role'] == 'assistant' else content))
    return out


def read_prompts(body, tokenizer, chat):
    """The token ids of a request's prompts, their text (what echo repeats) and the stop strings a chat adds."""
    if chat:
        try:
            ids, stop = render_chat(tokenizer, chat_messages(body.get('messages')))
        except ValueError as e:  # e.g. a character a char-level model has never seen
            raise APIError(str(e), 'messages')
        return [ids], None, stop
    prompt = body.get('prompt')
    is_ids = lambda p: isinstance(p, list) and p and all(type(t) is int for t in p)  # noqa: E731
    prompts = [prompt] if isinstance(prompt, str) or is_ids(prompt) else prompt
    require(isinstance(prompts, list) and 0 < len(prompts) <= max_batch_size
            and all(isinstance(p, str) or is_ids(p) for p in prompts),
            f"'prompt' must be a string, a list of token ids, or a list of 1 to {max_batch_size} of either", 'prompt')
    try:
        ids = [tokenizer.encode_prompt(p) if isinstance(p, str) else p for p in prompts]
    except ValueError as e:  # e.g. a character a char-level model has never seen
        raise APIError(str(e), 'prompt')
    require(all(0 <= t < tokenizer.n_vocab for p in ids for t in p),
            f"prompt token ids must be in 0..{tokenizer.n_vocab - 1}", 'prompt')
    return ids, [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts], []


def read_request(body, prompts, tokenizer, default_max_tokens, chat, echo=False):
    """The engine rows of a completion or chat request, n per prompt (the seed of choice c is seed + c, so each
    samples on its own), and how to answer. Row checks the sampling settings; fields this server does not know
    are ignored, as OpenAI's server ignores them. logprobs: completions take 0..5 alternatives, chat takes
    logprobs=true and top_logprobs 0..20."""
    row = {k: body[k] for k in ROW_SETTINGS if body.get(k) is not None}
    if body.get('max_completion_tokens') is not None:  # the chat API's newer name; 0 is an error, not the default
        row.setdefault('max_tokens', body['max_completion_tokens'])
    row.setdefault('max_tokens', min(default_max_tokens, max_tokens_limit))
    if chat:
        row['logprobs'] = body.get('top_logprobs') or 0 if flag(body, 'logprobs') else None
    else:
        row['logprobs'] = body.get('logprobs')
    require((chat or row['logprobs'] in (None, 0, 1, 2, 3, 4, 5)) and not isinstance(row['logprobs'], bool),
            f"'logprobs' must be an integer between 0 and 5, not {row['logprobs']!r}", 'logprobs')
    bias = row.get('logit_bias', {})
    require(isinstance(bias, dict) and all(re.fullmatch(r'\d{1,9}', k) and int(k) < tokenizer.n_vocab for k in bias),
            f"'logit_bias' must map token ids (0..{tokenizer.n_vocab - 1}, as strings) to numbers", 'logit_bias')
    row['logit_bias'] = {int(k): v for k, v in bias.items()}
    n, stop, options = body.get('n', 1), body.get('stop'), body.get('stream_options') or {}
    stop = [] if stop is None else stop
    require(type(n) is int and 1 <= n <= max_batch_size,
            f"'n' must be an integer between 1 and {max_batch_size}, not {n!r}", 'n')
    stop = [stop] if isinstance(stop, str) else stop
    require(isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP,
            f"'stop' must be a string or a list of at most {MAX_STOP} strings", 'stop')
    require(isinstance(options, dict), "'stream_options' must be an object", 'stream_options')
    seed = row.pop('seed', None)
    require(seed is None or type(seed) is int and 0 <= seed < 2 ** 63,
            f"'seed' must be an integer between 0 and {2 ** 63 - 1}, not {seed!r}", 'seed')
    best_of = body.get('best_of') if not chat and body.get('best_of') is not None else n
    require(type(best_of) is int and n <= best_of <= max_batch_size,
            f"'best_of' must be an integer between n ({n}) and {max_batch_size}, not {best_of!r}", 'best_of')
    require(best_of == n or not flag(body, 'stream'), "best_of cannot be streamed", 'best_of')
    try:
        make = json_grammar(tokenizer, body['response_format']) if body.get('response_format') is not None else None
    except FormatError as e:
        raise APIError(str(e), 'response_format')
    beams = best_of > 1 and best_of > n and row.get('temperature', 1.0) == 0  # greedy best_of: a beam search
    try:
        if beams:
            require(make is None and row['logprobs'] is None,
                    "best_of with temperature 0 (a beam search) takes no response_format or logprobs", 'best_of')
            rows = [beam_rows(p, best_of, row['max_tokens'], stop_tokens_of(tokenizer)) for p in prompts]
        else:  # best_of ranks the samples by their mean log probability: each row records its tokens'
            ranked = dict(row, logprobs=row['logprobs'] or 0) if best_of > n else row
            rows = [[Row(p, **ranked, seed=seed if seed is None else seed + i * best_of + j,
                         stop_tokens=stop_tokens_of(tokenizer), constraint=make and make())
                     for j in range(best_of)] for i, p in enumerate(prompts)]
    except SettingError as e:
        raise APIError(str(e), e.name)
    require((0 if echo else 1) <= row['max_tokens'] <= max_tokens_limit,  # 0 with echo: score the prompt only
            f"'max_tokens' must be between 1 and {max_tokens_limit}, not {row['max_tokens']}", 'max_tokens')
    return rows, dict(n=n, stop=stop, stream=flag(body, 'stream'), include_usage=flag(options, 'include_usage'),
                      logprobs=row['logprobs'], best_of=best_of, beams=beams)


def logprobs_json(tokenizer, entries, chat, offset=0):
    """OpenAI's logprobs object for [(token, logprob, top)], in the chat or the completions form. JSON has
    no NaN or infinity (a diverged model's logprobs): those are null."""
    text = lambda t: tokenizer.decode([t])  # noqa: E731
    entries = [(t, finite(lp), top and [(a, finite(b)) for a, b in top]) for t, lp, top in entries]
    if chat:
        entry = lambda t, lp: dict(token=text(t), logprob=lp, bytes=list(tokenizer.token_bytes([t])))  # noqa: E731
        return {'content': [dict(entry(t, lp), top_logprobs=[entry(a, b) for a, b in top]) for t, lp, top in entries]}
    tokens = [text(t) for t, _, _ in entries]
    offsets = [offset + sum(map(len, tokens[:i])) for i in range(len(tokens))]  # text_offset counts from `offset`
    return dict(tokens=tokens, token_logprobs=[lp for _, lp, _ in entries], text_offset=offsets,
                top_logprobs=[None if top is None else {text(a): b for a, b in top} for _, _, top in entries])


def finite(x):
    return x if x is None or math.isfinite(x) else None


def tokenize(tokenizer, body):
    """POST /tokenize, as llama-server: {"content": text} -> {"tokens": ids}."""
    require(isinstance(body.get('content'), str), "'content' must be a string", 'content')
    try:
        return {'tokens': tokenizer.encode(body['content'])}
    except ValueError as e:  # e.g. a character a char-level model has never seen
        raise APIError(str(e), 'content')


def detokenize(tokenizer, body):
    """POST /detokenize: {"tokens": ids} -> {"content": text}."""
    ids = body.get('tokens')
    require(isinstance(ids, list) and all(type(t) is int and 0 <= t < tokenizer.n_vocab for t in ids),
            f"'tokens' must be a list of token ids (0..{tokenizer.n_vocab - 1})", 'tokens')
    return {'content': tokenizer.decode(ids)}


def embeddings(loaded, body):
    """POST /v1/embeddings in OpenAI's shape: one vector per input (a string, a list of token ids, or a
    list of either), the mean of the model's last hidden states over its tokens."""
    inputs, fmt = body.get('input'), body.get('encoding_format') or 'float'
    is_ids = lambda p: isinstance(p, list) and p and all(type(t) is int for t in p)  # noqa: E731
    inputs = [inputs] if isinstance(inputs, str) or is_ids(inputs) else inputs
    require(isinstance(inputs, list) and 0 < len(inputs) <= 64 and all(isinstance(p, str) and p or is_ids(p) for p in inputs),
            "'input' must be a non-empty string, a list of token ids, or a list of up to 64 of either", 'input')
    require(fmt in ('float', 'base64'), "'encoding_format' must be 'float' or 'base64'", 'encoding_format')
    tokenizer, block_size = loaded.tokenizer, loaded.model.config.block_size
    try:
        ids = [tokenizer.encode(p) if isinstance(p, str) else p for p in inputs]
    except ValueError as e:
        raise APIError(str(e), 'input')
    require(all(0 < len(p) <= block_size and all(0 <= t < tokenizer.n_vocab for t in p) for p in ids),
            f"each input must be 1 to {block_size} tokens of ids in 0..{tokenizer.n_vocab - 1}", 'input')
    data = []
    for i, p in enumerate(ids):
        vector = embed(loaded.model, p)
        if fmt == 'base64':  # what the openai client asks for by default: little-endian float32s
            vector = base64.b64encode(struct.pack(f'<{len(vector)}f', *vector)).decode()
        data.append({'object': 'embedding', 'index': i, 'embedding': vector})
    tokens = sum(map(len, ids))
    return {'object': 'list', 'data': data, 'model': loaded.name,
            'usage': {'prompt_tokens': tokens, 'total_tokens': tokens}}


# -----------------------------------------------------------------------------
# HTTP

class Handler(BaseHTTPRequestHandler):
    server_version = 'nanoGPT-serve'
    timeout = 60  # seconds a single read or write may stall
    # HTTP/1.0: one request per connection, and a stream simply ends when the connection closes

    def setup(self):
        super().setup()
        # the whole request (line, headers, body) must arrive within request_timeout: a client that
        # sends a byte now and then cannot hold a thread. Past it, reads see the end of the stream.
        self.deadline = threading.Timer(request_timeout, lambda: self.connection.shutdown(socket.SHUT_RD))
        self.deadline.start()

    def finish(self):
        self.deadline.cancel()
        super().finish()

    def __getattr__(self, name):  # do_GET, do_POST, ...: every method goes to one dispatcher
        if name.startswith('do_'):
            return lambda: self.answer(name[3:])
        raise AttributeError(name)

    def log_message(self, format, *args):
        if not getattr(self, 'path', '').startswith('/api/train/log'):  # the page polls it every second
            super().log_message(format, *args)

    def send_error(self, code, message=None, explain=None):
        # http.server's own errors (a malformed request line, huge headers) in our shape too
        self.close_connection = True
        self.send_json(code, APIError(message or self.responses.get(code, ('error',))[0], status=code).body())

    def routes(self):
        """(method, path) -> a function giving the JSON answer, or None when it answered itself."""
        json_body = lambda: read_json(self.body)  # noqa: E731
        return {
            ('GET', '/'): self.page,
            ('GET', '/favicon.ico'): lambda: self.send_json(200, FAVICON, [('Cache-Control', 'max-age=86400')],
                                                            'image/svg+xml'),
            ('GET', '/health'): self.health,
            ('GET', '/v1/models'): lambda: {'object': 'list', 'data': [dict(
                id=worker.loaded.name, object='model', created=worker.loaded.created, owned_by='nanogpt')]},
            ('POST', '/v1/completions'): lambda: self.complete(json_body(), chat=False),
            ('POST', '/v1/chat/completions'): lambda: self.complete(json_body(), chat=True),
            ('GET', '/api/model'): lambda: dict(worker.loaded.describe(), batch=worker.status(),
                                                max_tokens_limit=max_tokens_limit, training=trainer.status()),
            ('POST', '/api/model/load'): lambda: self.model_load(json_body().get('out_dir')),
            ('GET', '/api/train/configs'): lambda: {'configs': trainer.configs()},
            ('POST', '/api/train/start'): lambda: trainer.start(json_body().get('config'),
                                                                json_body().get('overrides') or []),
            ('POST', '/api/train/stop'): trainer.stop,
            ('GET', '/api/train/status'): trainer.status,
            ('GET', '/api/train/log'): lambda: trainer.read_log(self.query.get('offset', ['0'])[0]),
            ('POST', '/tokenize'): lambda: tokenize(worker.loaded.tokenizer, json_body()),
            ('POST', '/detokenize'): lambda: detokenize(worker.loaded.tokenizer, json_body()),
            ('POST', '/v1/embeddings'): lambda: embeddings(worker.loaded, json_body()),
            ('GET', '/metrics'): lambda: self.send_json(200, metrics.text(gauges()), [],
                                                        'text/plain; version=0.0.4; charset=utf-8'),
        }

    def answer(self, method):
        Server.answering.add(self)
        self.headers_sent, url = False, urllib.parse.urlsplit(self.path)
        allowed = [m for m, path in self.routes() if path == url.path]
        try:
            require(allowed, f"unknown path: {method} {url.path}", status=404, code='not_found')
            require(method in allowed, f"{method} is not allowed on {url.path}", status=405, code='method_not_allowed')
            locked = api_key and url.path.startswith(('/v1/', '/api/'))  # the page and /health stay open
            require(not locked or hmac.compare_digest(self.headers.get('Authorization', '').encode(),
                                                      f'Bearer {api_key}'.encode()),
                    "missing or wrong API key: send 'Authorization: Bearer <key>'", status=401, code='invalid_api_key')
            self.body, self.query = self.read_body(), urllib.parse.parse_qs(url.query)
            self.deadline.cancel()
            require(worker is not None, "the model is loading; try again shortly", status=503, code='loading')
            result = self.routes()[method, url.path]()
            if result is not None:
                self.send_json(200, result)
        except OSError:
            pass  # the client went away, or stopped reading
        except Exception as e:
            if not isinstance(e, APIError):
                traceback.print_exc()
                e = server_error("internal server error")
            if not self.headers_sent:
                self.close_connection = True
                self.send_json(e.status, e.body(), [('Allow', ', '.join(allowed))] if e.status == 405 else [])
        finally:
            Server.answering.discard(self)

    def read_body(self):
        length = self.headers.get('Content-Length', '0').strip()
        require('chunked' not in self.headers.get('Transfer-Encoding', '').lower(),
                "send the body with a Content-Length", status=411, code='length_required')
        require(length.isdigit(), "invalid Content-Length")
        if int(length) > max_body_bytes:
            # read (and drop) what the client is sending, up to a bound: closing on an unread body resets the
            # connection, and the client would never see this answer
            left = min(int(length), DRAIN_BYTES)
            while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
                left -= len(chunk)
            raise APIError(f"the body is {length} bytes; the limit is {max_body_bytes}", status=413,
                           code='request_too_large')
        body = self.rfile.read(int(length))
        require(len(body) == int(length), f"the body did not arrive within {request_timeout} seconds", status=408,
                code='timeout')
        return body

    def send_head(self, status, content_type, headers=()):
        path = urllib.parse.urlsplit(getattr(self, 'path', '')).path
        metrics.add('nanogpt_requests_total', route=path if path in {p for _, p in self.routes()} else 'other',
                    status=status)
        self.send_response(status)
        for key, value in [('Content-Type', content_type), *headers]:
            self.send_header(key, value)
        self.end_headers()
        self.headers_sent = True

    def send_json(self, status, obj, headers=(), content_type='application/json'):
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_head(status, content_type, [('Content-Length', str(len(data))), *headers])
        self.wfile.write(data)

    def next_event(self, request):
        """The request's next event from the worker; None, and the request cancelled, once its client has gone."""
        while True:
            try:
                return request.events.get(timeout=0.25)
            except queue.Empty:
                if not worker.alive():
                    return ('error', WORKER_STOPPED)
                try:  # select first: a recv on this socket would wait for its timeout
                    gone = bool(select.select([self.connection], [], [], 0)[0]) and \
                        self.connection.recv(1, socket.MSG_PEEK) == b''
                except (OSError, ValueError):
                    gone = True
                if gone:
                    request.cancelled = True
                    return None

    def health(self):
        info = dict(worker.status(), status='ok', model=worker.loaded.name, auth=bool(api_key),
                    max_tokens_limit=max_tokens_limit)
        if not worker.alive():  # a load balancer or a user's check must see it: 503, not a hang
            self.send_json(503, dict(info, status='error', error=WORKER_STOPPED.message))
            return None
        return info

    def page(self):
        with open(os.path.join(HERE, 'templates', 'index.html'), 'rb') as f:
            self.send_json(200, f.read(), [('Cache-Control', 'no-store')], 'text/html; charset=utf-8')

    def model_load(self, new_out_dir):
        require(isinstance(new_out_dir, str) and new_out_dir, f"'out_dir' must be a path, not {new_out_dir!r}", 'out_dir')
        # only the out_dir the server started with and the folder the page's runs write to: never any path
        # on the machine (whether it exists is not told either)
        roots = [os.path.realpath(train_root or HERE)] + ([os.path.realpath(out_dir)] if init_from == 'resume' else [])
        require(any(is_under(new_out_dir, root) for root in roots),
                f"'out_dir' must be under {' or '.join(roots)} (where this server's models and training runs are)",
                'out_dir', 403, 'forbidden')
        require(os.path.isfile(os.path.join(new_out_dir, 'ckpt.pt')),
                f"'out_dir' must name a directory with a ckpt.pt, not {new_out_dir!r}", 'out_dir', 404, 'not_found')
        with load_lock:  # one load at a time
            try:
                loaded = Loaded('resume', new_out_dir)
            except (ValueError, OSError) as e:
                raise APIError(f"could not load the model: {e}", 'out_dir')
            done = threading.Event()
            worker.submit(load=(loaded, done))
            done.wait()
        if worker.loaded is not loaded:
            raise server_error("the model was loaded but the worker could not switch to it (see the server's log)")
        return loaded.describe()

    def complete(self, body, chat):
        """/v1/completions and /v1/chat/completions: one JSON body, or with stream=true server-sent events."""
        loaded = worker.loaded
        prompts, prompt_texts, chat_stop = read_prompts(body, loaded.tokenizer, chat)
        echo = not chat and flag(body, 'echo')
        rows, how = read_request(body, prompts, loaded.tokenizer, 256 if chat else 16, chat, echo)
        request = Request(loaded, rows, how['stop'] + chat_stop, echo)
        worker.submit(request)
        per, stream = how['best_of'], how['stream']  # rows per prompt: n, or best_of to pick n from
        n = len(rows) * per
        meta = dict(id=('chatcmpl-' if chat else 'cmpl-') + uuid.uuid4().hex, created=int(time.time()),
                    model=loaded.name, object=('chat.completion' if chat else 'text_completion') +
                    ('.chunk' if chat and stream else ''))
        texts, logprobs, reasons = [''] * n, [[] for _ in range(n)], [None] * n
        offsets = [0 if echo else len(loaded.tokenizer.decode(rows[i // per][0].prompt)) for i in range(n)]
        usage = dict(prompt_tokens=sum(len(r[0].prompt) for r in rows), completion_tokens=0)

        def choice(i, text, entries, finish_reason):
            lp = logprobs_json(loaded.tokenizer, entries, chat, offsets[i]) if how['logprobs'] is not None else None
            if not chat:
                return dict(index=i, text=text, logprobs=lp, finish_reason=finish_reason)
            if stream:
                return dict(index=i, delta={'content': text} if text else {}, logprobs=lp, finish_reason=finish_reason)
            return dict(index=i, message=dict(role='assistant', content=text), logprobs=lp, finish_reason=finish_reason)

        def send(obj):
            self.wfile.write(b'data: ' + json.dumps(obj).encode() + b'\n\n')

        if stream:
            self.send_head(200, 'text/event-stream', [('Cache-Control', 'no-cache')])
            for i in range(n if chat else 0):  # a chat stream opens with the role
                delta = {'role': 'assistant', 'content': ''}
                send(dict(meta, choices=[dict(index=i, delta=delta, logprobs=None, finish_reason=None)]))
        try:
            while None in reasons:
                event = self.next_event(request)
                if event is None:
                    return
                if event[0] == 'error':
                    if not stream:
                        raise event[1]
                    send(event[1].body())
                    break
                kind, i = event[:2]
                if kind == 'done':
                    piece, entries, reasons[i] = '', [], event[2]
                    usage['completion_tokens'] += event[3]
                else:  # with echo, the prompt's text and tokens come first
                    piece, entries = (prompt_texts[i // per], event[2]) if kind == 'prompt' else event[2:]
                    if chat and not texts[i]:
                        piece = piece.lstrip()  # a chat reply starts after "Assistant:" without its space
                    texts[i] += piece
                    logprobs[i] += entries
                if stream:
                    send(dict(meta, choices=[choice(i, piece, entries, reasons[i])]))
                    offsets[i] += len(piece)  # a chunk's text_offset continues the one before
            usage['total_tokens'] = usage['prompt_tokens'] + usage['completion_tokens']
            usage['prompt_tokens_details'] = {'cached_tokens': sum(r[0].cached_tokens for r in rows)}
            if not stream:
                picked = [i for p in range(len(rows)) for i in best(range(p * per, (p + 1) * per), logprobs, how)]
                return dict(meta, usage=usage, choices=[dict(choice(i, texts[i], logprobs[i], reasons[i]), index=k)
                                                        for k, i in enumerate(picked)])
            if None not in reasons and how['include_usage']:
                send(dict(meta, choices=[], usage=usage))
            self.wfile.write(b'data: [DONE]\n\n')
        except OSError:  # BrokenPipeError, ConnectionResetError, a timed-out write: the client has gone
            request.cancelled = True


def best(choices, logprobs, how):
    """The n of a prompt's choices to answer with: all of them, or with best_of the n best: the first
    n beams of a beam search (ranked already), else the highest mean log probability per token."""
    if how['best_of'] == how['n'] or how['beams']:
        return list(choices)[:how['n']]
    mean = lambda i: sum(e[1] for e in logprobs[i]) / len(logprobs[i]) if logprobs[i] else float('-inf')  # noqa: E731
    return sorted(choices, key=lambda i: -mean(i))[:how['n']]


class Server(ThreadingHTTPServer):
    request_queue_size = 1024  # the listen backlog: a burst of clients waits in the kernel, not refused
    daemon_threads = True  # an idle connection (a browser opens some ahead) must not hold up an exit
    answering = set()  # handlers answering a request: an exit waits a moment for their last chunk


def main():
    global worker, trainer, load_lock, dtype
    if min(max_batch_size, max_tokens_limit, max_body_bytes, max_waiting, request_timeout) < 1 or threads < 0 \
            or prefix_cache_tokens < 0:
        sys.exit("error: max_batch_size, max_tokens_limit, max_body_bytes, max_waiting and request_timeout "
                 "must be >= 1, threads >= 0, prefix_cache_tokens >= 0")
    # Every streamed token wakes an HTTP thread; with all cores in torch's pool it preempts one of
    # them mid-step and the whole step waits (2-core CPU, GPT-2 124M, bfloat16: one client got 71
    # tok/s on 2 threads, 96 on 1)
    set_threads(threads)
    try:
        dtype = auto_dtype(device, dtype)  # resolved once: reloads and /v1/models use the same
    except ValueError as e:
        sys.exit(f"error: {e}")
    try:
        server = Server((host, port), Handler)
    except OSError as e:
        sys.exit(f"error: cannot listen on {host}:{port}: {e}")
    # listening while the model loads, as llama-server: /health (and every other route) answers 503 until then
    trainer, load_lock = TrainRun(), threading.Lock()
    threading.Thread(target=server.serve_forever, name='http', daemon=True).start()
    print(f"listening on http://{host}:{server.server_address[1]} (loading the model)", flush=True)
    try:
        loaded = Loaded(init_from, out_dir)
    except (FileNotFoundError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    worker = Worker(loaded)
    if host not in ('127.0.0.1', 'localhost', '::1') and not api_key:
        print("warning: listening beyond this machine without an api_key", file=sys.stderr)
    # Ctrl-C and SIGTERM: stop accepting, end the open streams, stop a training run, exit 0
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"serving {loaded.name} ({loaded.info['parameters'] / 1e6:.2f}M parameters, {device}, "
          f"{torch.get_num_threads()} threads) on "
          f"http://{host}:{server.server_address[1]}", flush=True)
    stop.wait()
    print("shutting down", flush=True)
    server.shutdown()
    worker.close()
    trainer.stop()
    trainer.remove_log()
    server.server_close()
    deadline = time.time() + 5
    while Server.answering and time.time() < deadline:
        time.sleep(0.05)


if __name__ == '__main__':
    main()
