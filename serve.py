"""
Serve a model over HTTP: an OpenAI-style API (completions and chat, streamed or not) and a
small web page to generate, chat, train and inspect the model. Standard library only.

$ python serve.py --out_dir=out-shakespeare-char --port=8080
$ python serve.py --init_from=gpt2 --api_key=secret   # clients then send "Authorization: Bearer secret"

then open http://127.0.0.1:8080, or use any OpenAI client:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="secret")
    client.completions.create(model="any", prompt="ROMEO:", max_tokens=100)

Requests are decoded with continuous batching: one worker thread owns the model and a KV
cache of max_batch_size rows. Every step it feeds the newest token of every running request
through the model at once; a new request is prefilled into a row of its own between two
steps and joins the batch, a finished one (or one whose client went away) frees its row.
"""
import ast
import copy
import dataclasses
import hmac
import json
import math
import os
import queue
import re
import select
import shutil
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

from configurator import closest, configure, parse_value, type_ok
from model import apply_penalties, sample_next_token, token_counts
from sample import TextStream, load_model, load_tokenizer

# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (from out_dir), a gpt2 variant ('gpt2', 'gpt2-xl'), or a local transformers directory
out_dir = 'out'  # ignored unless init_from is 'resume'
host = '127.0.0.1'  # '0.0.0.0' listens on all interfaces: set api_key too
port = 8080  # 0 picks a free port (the line "serving ... on http://host:port" says which)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'  # or 'float16'
compile = False  # torch.compile the model
max_batch_size = 8  # rows of the KV cache: requests (times n) decoded together
max_tokens_limit = 1024  # the largest max_tokens a request may ask for
max_body_bytes = 1_000_000  # larger request bodies get 413
api_key = ''  # when set, /v1 and /api routes need "Authorization: Bearer <api_key>"
seed = 1337  # the global RNG, used by requests that bring no seed of their own
# -----------------------------------------------------------------------------
if __name__ == '__main__':
    configure(globals())  # before the constants below, so --help and overrides see only the settings above

HERE = os.path.dirname(os.path.abspath(__file__))  # templates/, config/ and train.py live here
CHAT_ROLES = {'system': 'System', 'user': 'User', 'assistant': 'Assistant'}
# a base model continuing a chat transcript would go on to write the next turn: stop there
CHAT_STOP = ['\nUser:', '\nSystem:', '\nAssistant:']
MAX_STOP = 4  # stop sequences a request may give, as OpenAI's API
MAX_WAITING = 256  # prompts queued for a free row before new requests get 429


class APIError(Exception):
    """Anything that ends a request with an error status, in OpenAI's error shape."""

    def __init__(self, message, param=None, status=400, code=None, kind='invalid_request_error'):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self):
        return {'error': {'message': self.message, 'type': self.kind, 'param': self.param, 'code': self.code}}


def jsonable(value):
    """Checkpoint values as JSON: tensors become numbers and NaN/inf become null (JSON has neither)."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# -----------------------------------------------------------------------------
# The model and its batch: one worker thread does all the model work

class Loaded:
    """A model with its tokenizer and where it came from. A reload replaces the whole object."""

    def __init__(self, init_from, out_dir, version):
        self.model, self.info = load_model(init_from, out_dir, device, dtype, compile)
        self.tokenizer = load_tokenizer(out_dir if init_from == 'resume' else None, self.info)
        self.init_from, self.out_dir, self.version = init_from, out_dir, version
        self.name = os.path.basename(os.path.abspath(out_dir)) if init_from == 'resume' else init_from
        self.created = int(time.time())

    def describe(self):
        cfg = self.model.config
        return jsonable({
            'id': self.name, 'source': self.info.get('source'), 'init_from': self.init_from,
            'out_dir': self.out_dir if self.init_from == 'resume' else None,
            'parameters': self.model.get_num_params(), 'model_args': dataclasses.asdict(cfg),
            'config': self.info.get('config'), 'iter_num': self.info.get('iter_num'),
            'best_val_loss': self.info.get('best_val_loss'), 'tokenizer': self.tokenizer.name,
            'vocab_size': cfg.vocab_size, 'block_size': cfg.block_size, 'device': device, 'dtype': dtype,
        })


class Request:
    """One API call: each of its prompts is sampled n times; every sample (a "choice") takes a
    row of the batch while it runs. The worker reports back through `events`:
    ('text', choice, piece), ('done', choice, finish_reason, tokens) or ('error', APIError)."""

    def __init__(self, version, prompts, options, stop):
        self.version, self.prompts, self.options, self.stop = version, prompts, options, stop
        self.events = queue.Queue()
        self.cancelled = False  # set by the HTTP thread when its client has gone


class Sequence:
    """A choice being generated: the request it belongs to and its own sampling state."""

    def __init__(self, request, choice, prompt, tokenizer, vocab_size, device):
        self.request, self.choice = request, choice
        self.history = list(prompt)  # prompt and generated tokens: make_room and the penalties read it
        self.text = TextStream(tokenizer, request.stop)
        self.generated = 0
        self.logits = None  # (1, vocab) scores for the next token
        o = request.options
        self.counts = None  # only requests that use a penalty pay for counting tokens
        if o['repetition_penalty'] != 1.0 or o['presence_penalty'] or o['frequency_penalty']:
            self.counts = token_counts([self.history], vocab_size, device)
        self.generator = None  # None: the global RNG
        if o['seed'] is not None:
            # a generator per choice: its random draws do not depend on who else is in the batch
            self.generator = torch.Generator(device=device).manual_seed(o['seed'] + choice)


def first_rows(cache, n):
    """The first n rows of `cache` as a cache of their own that shares its memory. The running
    sequences sit in rows 0..n-1, so a step computes only those, not all max_batch_size rows."""
    view = copy.copy(cache)
    view.k = [k[:n] for k in cache.k]
    view.v = [v[:n] for v in cache.v]
    view.lengths = cache.lengths[:n]
    return view


class Engine:
    """Continuous batching. Requests wait in a queue (one entry per prompt); between decode
    steps the worker prefills waiting prompts into free rows, then samples a token for every
    running row with that row's own settings, streams the text out, and frees finished rows."""

    def __init__(self, loaded):
        self.loaded = loaded
        self.cond = threading.Condition()  # guards waiting, pending_load and closing
        self.waiting = deque()  # (request, prompt index)
        self.pending_load = None  # a Loaded for the worker to switch to, and an Event to set when done
        self.closing = False
        self.active = []  # the Sequence in each row of the cache, row i = active[i]
        self.cache = None
        self.stats = dict(peak_active_rows=0, steps=0, generated_tokens=0, completed=0, cancelled=0)
        self.worker = threading.Thread(target=self.run, name='model-worker')
        self.worker.start()

    def new_cache(self):
        model = self.loaded.model
        cfg = model.config
        # learned positions: the window is block_size and make_room slides it. Rotary and ALiBi
        # models take the last block_size prompt tokens and may generate max_tokens_limit more.
        max_len = cfg.block_size if cfg.learned_positions else cfg.block_size + max_tokens_limit
        return model.new_cache(max_batch_size, max_len)

    # --- called from HTTP threads ---

    def submit(self, request):
        with self.cond:
            if self.closing:
                raise APIError("the server is shutting down", status=503, kind='server_error', code='shutting_down')
            if len(self.waiting) + len(request.prompts) > MAX_WAITING:
                raise APIError("too many requests are waiting; try again later", status=429, code='busy',
                               kind='rate_limit_error')
            for i in range(len(request.prompts)):
                self.waiting.append((request, i))
            self.cond.notify()

    def load(self, loaded):
        """Switch to another model; running requests are cut with an error."""
        done = threading.Event()
        with self.cond:
            if self.closing:
                raise APIError("the server is shutting down", status=503, kind='server_error', code='shutting_down')
            self.pending_load = (loaded, done)
            self.cond.notify()
        done.wait()

    def status(self):
        return dict(active_rows=len(self.active), waiting=len(self.waiting), max_batch_size=max_batch_size,
                    **self.stats)

    def close(self):
        """Stop the worker after its current step; every open request ends with an error."""
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.worker.join()
        if self.pending_load:
            self.pending_load[1].set()  # a load that came too late: let its HTTP thread finish
        error = APIError("the server is shutting down", status=503, kind='server_error', code='shutting_down')
        for request in {seq.request for seq in self.active} | {r for r, _ in self.waiting}:
            request.events.put(('error', error))
        self.active, self.waiting = [], deque()

    # --- the worker thread ---

    def run(self):
        with torch.inference_mode():
            self.cache = self.new_cache()
            while True:
                with self.cond:
                    while not (self.active or self.waiting or self.pending_load or self.closing):
                        self.cond.wait()
                    if self.closing:
                        return
                    pending, self.pending_load = self.pending_load, None
                try:
                    if pending:
                        self.switch(*pending)
                    self.admit()
                    if self.active:
                        self.sample()
                    if self.active:
                        self.step()
                except Exception:
                    # a bug must not take the server down: fail what was running, start clean
                    traceback.print_exc()
                    error = APIError("internal error while generating", status=500, kind='server_error')
                    for request in {seq.request for seq in self.active}:
                        request.events.put(('error', error))
                    self.active = []
                    self.cache = self.new_cache()

    def switch(self, loaded, done):
        error = APIError("the model was replaced while this request ran", status=503, kind='server_error',
                         code='model_replaced')
        for request in {seq.request for seq in self.active}:
            request.events.put(('error', error))
        self.active = []
        self.loaded = loaded
        self.cache = None  # free the old cache before allocating the new one
        self.cache = self.new_cache()
        done.set()

    def admit(self):
        """Prefill waiting prompts while there are free rows; first come, first served."""
        loaded = self.loaded
        model, cfg = loaded.model, loaded.model.config
        while True:
            with self.cond:
                while self.waiting and self.waiting[0][0].cancelled:
                    self.stats['cancelled'] += self.waiting.popleft()[0].options['n']
                if not self.waiting or self.waiting[0][0].options['n'] > max_batch_size - len(self.active):
                    return
                request, prompt_index = self.waiting.popleft()
            if request.version != loaded.version:  # tokenized for a model that is gone
                request.events.put(('error', APIError("the model was replaced; send the request again",
                                                      status=503, kind='server_error', code='model_replaced')))
                continue
            prompt = request.prompts[prompt_index]
            # prefill crops a learned-position model to block_size; do the same for the others
            one, logits = model.prefill(prompt if cfg.learned_positions else prompt[-cfg.block_size:])
            n = request.options['n']
            for j in range(n):  # n samples of one prompt share its prefill
                self.cache.copy_row(len(self.active), one)
                seq = Sequence(request, prompt_index * n + j, prompt, loaded.tokenizer, cfg.vocab_size,
                               logits.device)
                seq.logits = logits
                self.active.append(seq)
            self.stats['peak_active_rows'] = max(self.stats['peak_active_rows'], len(self.active))

    def sample(self):
        """One token for every running row, each with its request's settings."""
        finished = []
        for row, seq in enumerate(self.active):
            request, o = seq.request, seq.request.options
            if request.cancelled:
                finished.append(seq)
                self.stats['cancelled'] += 1
                continue
            logits = seq.logits
            if seq.counts is not None:
                logits = apply_penalties(logits, seq.counts, o['repetition_penalty'], o['presence_penalty'],
                                         o['frequency_penalty'])
            token = int(sample_next_token(logits, o['temperature'], o['top_k'] or None, o['top_p'], seq.generator))
            seq.history.append(token)
            seq.generated += 1
            self.stats['generated_tokens'] += 1
            if seq.counts is not None:
                seq.counts[0, token] += 1
            piece = seq.text.add(token)
            if not seq.text.stopped and seq.generated >= o['max_tokens']:
                piece += seq.text.finish()
            if piece:
                request.events.put(('text', seq.choice, piece))
            if seq.text.stopped or seq.generated >= o['max_tokens']:
                request.events.put(('done', seq.choice, 'stop' if seq.text.stopped else 'length', seq.generated))
                finished.append(seq)
                self.stats['completed'] += 1
            else:
                self.loaded.model.make_room(self.cache, row, seq.history)
        for seq in finished:
            # move the last row into the freed one, so the running rows stay 0..n-1
            row, last = self.active.index(seq), len(self.active) - 1
            if row != last:
                self.cache.copy_row(row, self.cache, last)
                self.active[row] = self.active[last]
            self.active.pop()

    def step(self):
        """One decode step over the running rows: the logits for each row's next token."""
        n = len(self.active)
        view = first_rows(self.cache, n)
        tokens = torch.tensor([seq.history[-1] for seq in self.active], device=self.cache.k[0].device)
        logits = self.loaded.model.decode_step(view, tokens)
        self.cache.lengths[:n] = view.lengths
        for row, seq in enumerate(self.active):
            seq.logits = logits[row:row + 1]
        self.stats['steps'] += 1


# -----------------------------------------------------------------------------
# Training runs started from the page: train.py as a subprocess, one at a time

def train_settings():
    """train.py's settings and their defaults, read from its source (the plain assignments
    before configure(globals())), so an override can be checked as configurator will check it."""
    with open(os.path.join(HERE, 'train.py')) as f:
        tree = ast.parse(f.read())
    settings = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and 'configure(' in ast.unparse(node):
            break
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value.body if isinstance(node.value, ast.IfExp) else node.value  # dtype = 'a' if .. else 'b'
            try:
                settings[node.targets[0].id] = ast.literal_eval(value)
            except ValueError:
                pass
    return settings


def check_override(arg, settings):
    """An override must be --key=value for a known setting, with a value of the setting's type."""
    if not isinstance(arg, str):
        raise APIError("each override must be a string like --max_iters=100", 'overrides')
    match = re.fullmatch(r'--([A-Za-z_][A-Za-z0-9_]*)=(.*)', arg)
    if not match:
        raise APIError(f"override {arg!r} is not of the form --key=value", 'overrides')
    key, text = match.groups()
    if key not in settings:
        raise APIError(f"unknown setting '{key}'{closest(key, list(settings))}", 'overrides')
    value = parse_value(text)
    if not type_ok(settings[key], value):
        raise APIError(f"setting '{key}' expects {type(settings[key]).__name__}, got {type(value).__name__} "
                       f"'{text}'", 'overrides')


class TrainRun:
    """At most one train.py subprocess. Its stdout and stderr go to a log file in a temporary
    directory, which the page reads piece by piece."""

    def __init__(self):
        self.lock = threading.Lock()
        self.proc, self.run_id, self.log_path, self.log_dir, self.command = None, None, None, None, None
        self.started = None

    def configs(self):
        folder = os.path.join(HERE, 'config')
        return sorted(f for f in os.listdir(folder) if f.endswith('.py') and not f.startswith('_'))

    def start(self, config_name, overrides):
        if not isinstance(config_name, str) or not config_name:
            raise APIError("'config' must be the name of a file in config/", 'config')
        if '/' in config_name or '\\' in config_name or '..' in config_name or config_name not in self.configs():
            raise APIError(f"'{config_name}' is not a config file in config/", 'config')
        if not isinstance(overrides, list) or len(overrides) > 100:
            raise APIError("'overrides' must be a list of --key=value strings", 'overrides')
        settings = train_settings()
        for arg in overrides:
            check_override(arg, settings)
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                raise APIError("a training run is already running; stop it first", status=409, code='busy')
            if self.log_dir:
                shutil.rmtree(self.log_dir, ignore_errors=True)
            self.log_dir = tempfile.mkdtemp(prefix='nanogpt-train-')
            self.log_path = os.path.join(self.log_dir, 'train.log')
            # an argument list, never a shell: the overrides reach train.py exactly as written
            self.command = [sys.executable, 'train.py', os.path.join('config', config_name), *overrides]
            with open(self.log_path, 'ab') as log:
                log.write(('$ python ' + ' '.join(self.command[1:]) + '\n').encode())
                log.flush()
                # its own session: a Ctrl-C meant for the server does not hit the run directly
                self.proc = subprocess.Popen(self.command, cwd=HERE, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True,
                                             env=dict(os.environ, PYTHONUNBUFFERED='1'))
            self.run_id = uuid.uuid4().hex[:12]
            self.started = time.time()
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

    def status(self):
        if self.proc is None:
            return {'run': None, 'running': False}
        return {'run': self.run_id, 'running': self.proc.poll() is None, 'returncode': self.proc.returncode,
                'command': ['python', *self.command[1:]], 'log_file': self.log_path, 'started': self.started}

    def read_log(self, offset, limit=1 << 16):
        """Log text from byte `offset` on. While the run goes on, only whole lines."""
        status = self.status()
        if self.proc is None:
            return dict(status, text='', offset=0)
        with open(self.log_path, 'rb') as f:
            f.seek(offset)
            data = f.read(limit)
        if status['running'] or len(data) == limit:
            end = data.rfind(b'\n') + 1
            if end > 0 or len(data) < limit:
                data = data[:end]
        return dict(status, text=data.decode('utf-8', errors='replace'), offset=offset + len(data))


# -----------------------------------------------------------------------------
# Reading the requests

def number(body, name, kind, default, ok, rule):
    """body[name] as an int or float (not a bool) satisfying ok(); absent or null gives default."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise APIError(f"'{name}' must be {'a number' if kind is float else 'an integer'}, not {value!r}", name)
    if not ok(value):
        raise APIError(f"'{name}' must be {rule}, not {value!r}", name)
    return kind(value)


def flag(body, name):
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(f"'{name}' must be true or false, not {value!r}", name)
    return value


def sampling_options(body, default_max_tokens):
    """The sampling fields shared by completions and chat, checked."""
    if body.get('max_tokens') is None and body.get('max_completion_tokens') is not None:
        body = dict(body, max_tokens=body['max_completion_tokens'])  # the chat API's newer name for it
    stop = body.get('stop')
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise APIError("'stop' must be a string or a list of strings", 'stop')
    if len(stop) > MAX_STOP:
        raise APIError(f"'stop' may hold at most {MAX_STOP} sequences", 'stop')
    stream_options = body.get('stream_options')
    if stream_options is not None and not isinstance(stream_options, dict):
        raise APIError("'stream_options' must be an object", 'stream_options')
    return dict(
        max_tokens=number(body, 'max_tokens', int, min(default_max_tokens, max_tokens_limit),
                          lambda v: 1 <= v <= max_tokens_limit, f"between 1 and {max_tokens_limit}"),
        temperature=number(body, 'temperature', float, 1.0, lambda v: 0 <= v <= 100, "between 0 and 100"),
        top_p=number(body, 'top_p', float, 1.0, lambda v: 0 < v <= 1, "in (0, 1]"),
        top_k=number(body, 'top_k', int, 0, lambda v: v >= 0, ">= 0 (0 means no limit)"),
        n=number(body, 'n', int, 1, lambda v: 1 <= v <= max_batch_size, f"between 1 and {max_batch_size}"),
        presence_penalty=number(body, 'presence_penalty', float, 0.0, lambda v: -2 <= v <= 2, "between -2 and 2"),
        frequency_penalty=number(body, 'frequency_penalty', float, 0.0, lambda v: -2 <= v <= 2, "between -2 and 2"),
        repetition_penalty=number(body, 'repetition_penalty', float, 1.0, lambda v: 0 < v <= 100, "in (0, 100]"),
        seed=number(body, 'seed', int, None, lambda v: 0 <= v < 2 ** 62, "between 0 and 2**62"),
        stop=stop,
        stream=flag(body, 'stream'),
        include_usage=flag(stream_options or {}, 'include_usage'),
    )


def message_text(message, i):
    if not isinstance(message, dict):
        raise APIError(f"messages[{i}] must be an object with 'role' and 'content'", 'messages')
    role, content = message.get('role'), message.get('content')
    if role not in CHAT_ROLES:
        raise APIError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, not {role!r}", 'messages')
    if content is None:
        return role, ''
    if isinstance(content, str):
        return role, content
    # the list form: [{"type": "text", "text": "..."}, ...]
    if isinstance(content, list) and all(isinstance(p, dict) and p.get('type') == 'text'
                                         and isinstance(p.get('text'), str) for p in content):
        return role, ''.join(p['text'] for p in content)
    raise APIError(f"messages[{i}].content must be a string or a list of text parts", 'messages')


def chat_prompt(messages):
    """A conversation as a plain transcript that a base model continues after 'Assistant:'."""
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list", 'messages')
    lines = [f"{CHAT_ROLES[role]}: {text}" for role, text in (message_text(m, i) for i, m in enumerate(messages))]
    return '\n'.join(lines) + '\nAssistant:'


def refuse_constant(name):
    # Python's json reads NaN and Infinity, which are not JSON: refuse them rather than sample with them
    raise ValueError(f"{name} is not a JSON number")


# -----------------------------------------------------------------------------
# HTTP

open_requests, counter_lock = 0, threading.Lock()  # requests being answered, so an exit can wait for them


class Handler(BaseHTTPRequestHandler):
    server_version = 'nanoGPT-serve'
    timeout = 60  # seconds a client may stall while sending its request
    # HTTP/1.0: one request per connection, and a stream simply ends when the connection closes

    def do_GET(self):
        self.handle_method('GET')

    def do_POST(self):
        self.handle_method('POST')

    def do_PUT(self):
        self.handle_method('PUT')

    def do_PATCH(self):
        self.handle_method('PATCH')

    def do_DELETE(self):
        self.handle_method('DELETE')

    def do_OPTIONS(self):
        self.handle_method('OPTIONS')

    def do_HEAD(self):
        self.handle_method('HEAD')

    def log_message(self, format, *args):
        if not getattr(self, 'path', '').startswith('/api/train/log'):  # the page polls it every second
            super().log_message(format, *args)

    def send_error(self, code, message=None, explain=None):
        # http.server's own errors (a malformed request line, an unknown method, huge headers) in our shape too
        if code == 501:
            code, message = 405, f"method {self.command} is not allowed"
        self.close_connection = True
        self.send_json(code, APIError(message or self.responses.get(code, ('error',))[0], status=code).body())

    def handle_method(self, method):
        global open_requests
        self.headers_sent, self.unread = False, 0
        with counter_lock:
            open_requests += 1
        try:
            self.route(method)
        except APIError as e:
            if not self.headers_sent:
                headers = [('Allow', e.allow)] if hasattr(e, 'allow') else []
                self.send_json(e.status, e.body(), headers)
                self.drain(self.unread)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the client went away, or stopped reading
        except Exception:
            traceback.print_exc()
            if not self.headers_sent:
                self.send_json(500, APIError("internal server error", status=500, kind='server_error').body())
        finally:
            with counter_lock:
                open_requests -= 1

    def route(self, method):
        url = urllib.parse.urlsplit(self.path)
        # read the body before any answer: closing a socket with unread data would reset the connection
        body = self.read_body()
        routes = {
            '/': {'GET': self.page},
            '/health': {'GET': self.health},
            '/v1/models': {'GET': self.models},
            '/v1/completions': {'POST': self.completions},
            '/v1/chat/completions': {'POST': self.chat_completions},
            '/api/model': {'GET': self.model_info},
            '/api/model/load': {'POST': self.model_load},
            '/api/train/configs': {'GET': self.train_configs},
            '/api/train/start': {'POST': self.train_start},
            '/api/train/stop': {'POST': self.train_stop},
            '/api/train/status': {'GET': self.train_status},
            '/api/train/log': {'GET': self.train_log},
        }
        if url.path not in routes:
            raise APIError(f"unknown path: {method} {url.path}", status=404, code='not_found')
        if method not in routes[url.path]:
            e = APIError(f"{method} is not allowed on {url.path}", status=405, code='method_not_allowed')
            e.allow = ', '.join(routes[url.path])
            raise e
        if api_key and url.path.startswith(('/v1/', '/api/')):
            sent = self.headers.get('Authorization', '')
            if not hmac.compare_digest(sent.encode(), f'Bearer {api_key}'.encode()):
                raise APIError("missing or wrong API key: send 'Authorization: Bearer <key>'", status=401,
                               code='invalid_api_key')
        routes[url.path][method](url, body)

    def read_body(self):
        if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
            self.close_connection = True
            raise APIError("send the body with a Content-Length", status=411, code='length_required')
        text = self.headers.get('Content-Length', '0').strip()
        if not text.isdigit():
            self.close_connection = True
            raise APIError("invalid Content-Length", status=400)
        length = int(text)
        if length > max_body_bytes:
            self.close_connection = True
            self.unread = length  # handle_method drops it after answering
            raise APIError(f"the body is {length} bytes; the limit is {max_body_bytes}", status=413,
                           code='request_too_large')
        try:
            return self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            raise APIError(f"the body did not arrive within {self.timeout} seconds", status=408, code='timeout')

    def drain(self, length):
        """Read and drop an unwanted body for a little while, so that the client, still sending
        it, gets to read our answer (closing with unread data would reset the connection)."""
        deadline = time.time() + 2
        self.connection.settimeout(0.5)
        try:
            while length > 0 and time.time() < deadline:
                chunk = self.rfile.read1(min(length, 1 << 16))
                if not chunk:
                    break
                length -= len(chunk)
        except OSError:
            pass

    def json_object(self, body):
        try:
            text = body.decode('utf-8')
        except UnicodeDecodeError:
            raise APIError("the body is not valid UTF-8")
        try:
            value = json.loads(text, parse_constant=refuse_constant)
        except (ValueError, RecursionError) as e:
            raise APIError(f"the body is not valid JSON: {e}")
        if not isinstance(value, dict):
            raise APIError("the body must be a JSON object")
        return value

    def send_json(self, status, obj, headers=()):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        self.headers_sent = True
        if self.command != 'HEAD':
            self.wfile.write(data)

    def client_gone(self):
        """True when the client closed its end: the socket reads as end-of-file."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b''
        except (OSError, ValueError):
            return True

    def next_event(self, request):
        """The request's next event from the worker; None (and the request cancelled) if the client left."""
        while True:
            try:
                return request.events.get(timeout=0.25)
            except queue.Empty:
                if self.client_gone():
                    request.cancelled = True
                    return None

    # --- routes ---

    def page(self, url, body):
        try:
            with open(os.path.join(HERE, 'templates', 'index.html'), 'rb') as f:
                data = f.read()
        except OSError:
            raise APIError("templates/index.html is missing", status=404, code='not_found')
        self.send_response(200)
        self.send_header('Content-Type', 'text/html; charset=utf-8')
        self.send_header('Content-Length', str(len(data)))
        self.send_header('Cache-Control', 'no-store')
        self.end_headers()
        self.headers_sent = True
        self.wfile.write(data)

    def health(self, url, body):
        self.send_json(200, {'status': 'ok', 'model': engine.loaded.name, 'auth': bool(api_key),
                             'max_tokens_limit': max_tokens_limit, **engine.status()})

    def models(self, url, body):
        loaded = engine.loaded
        self.send_json(200, {'object': 'list', 'data': [
            {'id': loaded.name, 'object': 'model', 'created': loaded.created, 'owned_by': 'nanogpt'}]})

    def model_info(self, url, body):
        self.send_json(200, dict(engine.loaded.describe(), batch=engine.status(), max_tokens_limit=max_tokens_limit,
                                 training=trainer.status()))

    def model_load(self, url, body):
        body = self.json_object(body)
        new_init_from = body.get('init_from') or 'resume'
        new_out_dir = body.get('out_dir')
        if not isinstance(new_init_from, str):
            raise APIError("'init_from' must be a string", 'init_from')
        if new_init_from == 'resume' and not (isinstance(new_out_dir, str) and new_out_dir):
            raise APIError("'out_dir' must name a directory with a ckpt.pt", 'out_dir')
        if new_init_from == 'resume' and not os.path.isfile(os.path.join(new_out_dir, 'ckpt.pt')):
            raise APIError(f"no checkpoint at {os.path.join(new_out_dir, 'ckpt.pt')}", 'out_dir', status=404,
                           code='not_found')
        with load_lock:  # one load at a time
            try:
                loaded = Loaded(new_init_from, new_out_dir or out_dir, engine.loaded.version + 1)
            except Exception as e:
                raise APIError(f"could not load the model: {type(e).__name__}: {e}", 'out_dir')
            engine.load(loaded)
        self.send_json(200, loaded.describe())

    def train_configs(self, url, body):
        self.send_json(200, {'configs': trainer.configs()})

    def train_start(self, url, body):
        body = self.json_object(body)
        self.send_json(200, trainer.start(body.get('config'), body.get('overrides') or []))

    def train_stop(self, url, body):
        self.send_json(200, trainer.stop())

    def train_status(self, url, body):
        self.send_json(200, trainer.status())

    def train_log(self, url, body):
        query = urllib.parse.parse_qs(url.query)
        text = query.get('offset', ['0'])[0]
        if not text.isdigit():
            raise APIError("'offset' must be a non-negative integer", 'offset')
        self.send_json(200, trainer.read_log(int(text)))

    def completions(self, url, body):
        body = self.json_object(body)
        options = sampling_options(body, default_max_tokens=16)  # OpenAI's default for completions
        prompt = body.get('prompt')
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
            raise APIError("'prompt' must be a string or a non-empty list of strings", 'prompt')
        if len(prompts) > max_batch_size:
            raise APIError(f"at most {max_batch_size} prompts per request", 'prompt')
        self.generate(prompts, options, options['stop'], chat=False, echo=flag(body, 'echo'))

    def chat_completions(self, url, body):
        body = self.json_object(body)
        options = sampling_options(body, default_max_tokens=256)
        prompt = chat_prompt(body.get('messages'))
        self.generate([prompt], options, options['stop'] + CHAT_STOP, chat=True, echo=False)

    def generate(self, prompts, options, stop, chat, echo):
        loaded = engine.loaded
        ids = []
        for p in prompts:
            try:
                ids.append(loaded.tokenizer.encode_prompt(p))
            except ValueError as e:  # e.g. a character a char-level model has never seen
                raise APIError(str(e), 'messages' if chat else 'prompt')
        request = Request(loaded.version, ids, options, stop)
        engine.submit(request)
        n_choices = len(prompts) * options['n']
        meta = dict(id=('chatcmpl-' if chat else 'cmpl-') + uuid.uuid4().hex, created=int(time.time()),
                    model=loaded.name)
        prompt_tokens = sum(len(p) for p in ids)
        if options['stream']:
            self.stream(request, meta, n_choices, prompt_tokens, chat, [prompts[i // options['n']] for i in
                                                                        range(n_choices)] if echo else None)
            return
        texts, reasons, generated = [''] * n_choices, [None] * n_choices, 0
        done = 0
        while done < n_choices:
            event = self.next_event(request)
            if event is None:
                return
            if event[0] == 'error':
                raise event[1]
            if event[0] == 'text':
                texts[event[1]] += event[2]
            else:
                reasons[event[1]], done, generated = event[2], done + 1, generated + event[3]
        usage = dict(prompt_tokens=prompt_tokens, completion_tokens=generated, total_tokens=prompt_tokens + generated)
        if chat:
            choices = [dict(index=i, message=dict(role='assistant', content=texts[i].lstrip()), logprobs=None,
                            finish_reason=reasons[i]) for i in range(n_choices)]
            self.send_json(200, dict(meta, object='chat.completion', choices=choices, usage=usage))
        else:
            if echo:
                texts = [prompts[i // options['n']] + t for i, t in enumerate(texts)]
            choices = [dict(index=i, text=texts[i], logprobs=None, finish_reason=reasons[i]) for i in range(n_choices)]
            self.send_json(200, dict(meta, object='text_completion', choices=choices, usage=usage))

    def stream(self, request, meta, n_choices, prompt_tokens, chat, echo_texts):
        """Server-sent events: a chunk per piece of text, a last chunk per choice with its
        finish_reason, optionally the usage, then [DONE]. A failed write means the client left."""
        obj = 'chat.completion.chunk' if chat else 'text_completion'

        def chunk(choice, text=None, finish_reason=None, role=False):
            if chat:
                delta = {'role': 'assistant', 'content': ''} if role else ({'content': text} if text else {})
                c = dict(index=choice, delta=delta, logprobs=None, finish_reason=finish_reason)
            else:
                c = dict(index=choice, text=text or '', logprobs=None, finish_reason=finish_reason)
            return dict(meta, object=obj, choices=[c])

        self.send_response(200)
        self.send_header('Content-Type', 'text/event-stream')
        self.send_header('Cache-Control', 'no-cache')
        self.end_headers()
        self.headers_sent = True
        started = [False] * n_choices  # chat: leading spaces after "Assistant:" are dropped
        generated, done = 0, 0
        try:
            for i in range(n_choices):
                if chat:
                    self.send_event(chunk(i, role=True))
                elif echo_texts:
                    self.send_event(chunk(i, echo_texts[i]))
            while done < n_choices:
                event = self.next_event(request)
                if event is None:
                    return
                if event[0] == 'error':
                    self.send_event(event[1].body())
                    break
                if event[0] == 'text':
                    _, i, text = event
                    if chat and not started[i]:
                        text = text.lstrip()
                        started[i] = bool(text)
                    if text:
                        self.send_event(chunk(i, text))
                else:
                    _, i, reason, tokens = event
                    generated, done = generated + tokens, done + 1
                    self.send_event(chunk(i, finish_reason=reason))
            if done == n_choices and request.options['include_usage']:
                self.send_event(dict(meta, object=obj, choices=[], usage=dict(
                    prompt_tokens=prompt_tokens, completion_tokens=generated, total_tokens=prompt_tokens + generated)))
            self.wfile.write(b'data: [DONE]\n\n')
        except OSError:  # BrokenPipeError, ConnectionResetError, a timed-out write: the client has gone
            request.cancelled = True

    def send_event(self, obj):
        self.wfile.write(b'data: ' + json.dumps(obj).encode() + b'\n\n')


# -----------------------------------------------------------------------------

def main():
    global engine, trainer, load_lock
    if dtype not in ('float32', 'bfloat16', 'float16'):
        sys.exit(f"error: dtype must be float32, bfloat16 or float16, not '{dtype}'")
    if max_batch_size < 1 or max_tokens_limit < 1 or max_body_bytes < 1:
        sys.exit("error: max_batch_size, max_tokens_limit and max_body_bytes must be >= 1")
    torch.manual_seed(seed)
    try:
        loaded = Loaded(init_from, out_dir, version=0)
    except (FileNotFoundError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    engine, trainer, load_lock = Engine(loaded), TrainRun(), threading.Lock()
    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        engine.close()
        sys.exit(f"error: cannot listen on {host}:{port}: {e}")
    if host not in ('127.0.0.1', 'localhost', '::1') and not api_key:
        print("warning: listening beyond this machine without an api_key", file=sys.stderr)

    # Ctrl-C and SIGTERM: stop accepting, end the open streams, stop a training run, exit 0
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, name='http', daemon=True).start()
    print(f"serving {loaded.name} ({loaded.model.get_num_params() / 1e6:.2f}M parameters, {device}) on "
          f"http://{host}:{server.server_address[1]}", flush=True)
    while not stop.wait(0.5):
        pass
    print("shutting down", flush=True)
    server.shutdown()
    server.server_close()
    engine.close()
    trainer.stop()
    # give the HTTP threads a moment to write the last chunk of their streams
    deadline = time.time() + 5
    while open_requests and time.time() < deadline:
        time.sleep(0.05)
    if trainer.log_dir:
        shutil.rmtree(trainer.log_dir, ignore_errors=True)


if __name__ == '__main__':
    main()
