"""
Serve a model over HTTP: an OpenAI-style API (completions and chat, streamed or not) and a
small web page to generate, chat, train and inspect the model. Standard library only.

$ python serve.py --out_dir=out-shakespeare-char --port=8080
$ python serve.py --init_from=gpt2 --api_key=secret   # clients then send "Authorization: Bearer secret"

then open http://127.0.0.1:8080, or point any OpenAI client at http://127.0.0.1:8080/v1.
Besides completions and chat (response_format for JSON output, best_of on completions), as llama-server:
POST /tokenize, POST /detokenize, POST /v1/embeddings, GET /metrics (Prometheus), GET /health (503 while
the model loads).
This file is the settings, the routes and main. One worker thread owns the model and drives the decode
engine (serving/worker.py): a request waits in a queue for free rows, joins the running batch between two
steps and leaves it when it ends. The OpenAI protocol is serving/api.py, the page's training runs
serving/runs.py, the metrics serving/metrics.py.
"""
import hmac
import json
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from common import auto_dtype, set_threads
from configurator import configure
from engine import Row
from serving.api import (WORKER_STOPPED, APIError, Completion, detokenize, embeddings, read_json, require, server_error,
                         tokenize)
from serving.metrics import Metrics, gauges
from serving.runs import TrainRun, is_under
from serving.worker import Loaded, Worker

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
draft = ''  # requests' default speculative decoding: 'ngram', a draft model's out_dir, '' off (docs/speculative.md)
draft_tokens = 4  # tokens a draft proposes per step
# -----------------------------------------------------------------------------
if __name__ == '__main__':
    configure(globals())  # before the constants below, so --help and overrides see only the settings above

HERE = os.path.dirname(os.path.abspath(__file__))  # templates/, config/, data/ and train.py live here
DRAIN_BYTES = 64 << 20  # of a body over max_body_bytes, read this much before the 413 (within request_timeout)
# the page's icon: browsers ask for /favicon.ico on every page, and log a 404 without one
FAVICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="7" '
           b'fill="#2563eb"/><text x="16" y="23" font-family="sans-serif" font-size="20" font-weight="700" '
           b'fill="#fff" text-anchor="middle">n</text></svg>')


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
        worker, trainer, metrics = self.server.worker, self.server.trainer, self.server.metrics
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
                                                max_tokens_limit=worker.max_tokens_limit, training=trainer.status()),
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
            ('GET', '/metrics'): lambda: self.send_json(200, metrics.text(gauges(worker.status())), [],
                                                        'text/plain; version=0.0.4; charset=utf-8'),
        }

    def answer(self, method):
        self.server.answering.add(self)
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
            require(self.server.worker is not None, "the model is loading; try again shortly", status=503, code='loading')
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
            self.server.answering.discard(self)

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
        self.server.metrics.add('nanogpt_requests_total', route=path if path in {p for _, p in self.routes()} else 'other',
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
                if not self.server.worker.alive():
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
        worker = self.server.worker
        info = dict(worker.status(), status='ok', model=worker.loaded.name, auth=bool(api_key),
                    max_tokens_limit=worker.max_tokens_limit)
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
        roots = self.server.model_roots
        require(any(is_under(new_out_dir, root) for root in roots),
                f"'out_dir' must be under {' or '.join(roots)} (where this server's models and training runs are)",
                'out_dir', 403, 'forbidden')
        require(os.path.isfile(os.path.join(new_out_dir, 'ckpt.pt')),
                f"'out_dir' must name a directory with a ckpt.pt, not {new_out_dir!r}", 'out_dir', 404, 'not_found')
        worker = self.server.worker
        with self.server.load_lock:  # one load at a time
            try:
                old = worker.loaded
                loaded = Loaded('resume', new_out_dir, old.device, old.dtype, old.quantize, draft if draft == 'ngram' else '')
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
        worker = self.server.worker
        answer = Completion(worker.loaded, body, chat, worker.max_batch_size, worker.max_tokens_limit, worker.draft)
        worker.submit(answer.request)
        send = lambda obj: self.wfile.write(b'data: ' + json.dumps(obj).encode() + b'\n\n')  # noqa: E731
        try:
            if answer.stream:
                self.send_head(200, 'text/event-stream', [('Cache-Control', 'no-cache')])
                for chunk in answer.opening():
                    send(chunk)
            while not answer.finished:
                event = self.next_event(answer.request)
                if event is None:  # its client has gone
                    return
                for chunk in answer.take(event):
                    send(chunk)
            if not answer.stream:
                return answer.body()
            for chunk in answer.closing():
                send(chunk)
            self.wfile.write(b'data: [DONE]\n\n')
        except OSError:  # BrokenPipeError, ConnectionResetError, a timed-out write: the client has gone
            answer.request.cancelled = True


class Server(ThreadingHTTPServer):
    """The HTTP server and what its handlers answer from: the worker (None until the model has loaded: every
    route answers 503), the page's training runs, the folders a model may be loaded from, the metrics."""
    request_queue_size = 1024  # the listen backlog: a burst of clients waits in the kernel, not refused
    daemon_threads = True  # an idle connection (a browser opens some ahead) must not hold up an exit

    def __init__(self, address, trainer, model_roots, worker=None, metrics=None):
        super().__init__(address, Handler)
        self.trainer, self.model_roots, self.worker = trainer, model_roots, worker
        self.metrics = metrics or Metrics()
        self.load_lock = threading.Lock()  # one model load at a time
        self.answering = set()  # handlers answering a request: an exit waits a moment for their last chunk


def main():
    global dtype
    if min(max_batch_size, max_tokens_limit, max_body_bytes, max_waiting, request_timeout) < 1 or threads < 0 \
            or prefix_cache_tokens < 0:
        sys.exit("error: max_batch_size, max_tokens_limit, max_body_bytes, max_waiting and request_timeout "
                 "must be >= 1, threads >= 0, prefix_cache_tokens >= 0")
    try:
        Row([0], 1, draft=draft if draft in ('', 'ngram') else 'model', draft_tokens=draft_tokens)  # as a request's
    except ValueError as e:
        sys.exit(f"error: {e}")
    # Every streamed token wakes an HTTP thread; with all cores in torch's pool it preempts one of
    # them mid-step and the whole step waits (2-core CPU, GPT-2 124M, bfloat16: one client got 71
    # tok/s on 2 threads, 96 on 1)
    set_threads(threads)
    try:
        dtype = auto_dtype(device, dtype)  # resolved once: reloads and /v1/models use the same
    except ValueError as e:
        sys.exit(f"error: {e}")
    # the page's runs write under train_root; a model loads from there or from the out_dir the server started with
    root = os.path.realpath(train_root or HERE)
    model_roots = [root] + ([os.path.realpath(out_dir)] if init_from == 'resume' else [])
    try:
        server = Server((host, port), TrainRun(HERE, root), model_roots)
    except OSError as e:
        sys.exit(f"error: cannot listen on {host}:{port}: {e}")
    # listening while the model loads, as llama-server: /health (and every other route) answers 503 until then
    threading.Thread(target=server.serve_forever, name='http', daemon=True).start()
    print(f"listening on http://{host}:{server.server_address[1]} (loading the model)", flush=True)
    try:
        loaded = Loaded(init_from, out_dir, device, dtype, quantize, draft)
    except (FileNotFoundError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    server.worker = Worker(loaded, max_batch_size, max_tokens_limit, max_waiting, seed, prefix_cache_tokens,
                           server.metrics, draft_tokens)
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
    server.worker.close()
    server.trainer.stop()
    server.trainer.remove_log()
    server.server_close()
    deadline = time.time() + 5
    while server.answering and time.time() < deadline:
        time.sleep(0.05)


if __name__ == '__main__':
    main()
