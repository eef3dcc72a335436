"""
The worker thread that owns the model (Loaded) and drives the decode engine for serve.py: requests wait in
a queue, join the running batch between steps and leave when they end; a fault in one request ends only
it, a fault outside any request restarts the engine, a model load swaps it between steps.
"""
import math
import os
import threading
import time
import traceback
from collections import deque

from engine import Engine, SettingError
from serving.api import WORKER_STOPPED, APIError, server_error
from serving.metrics import Metrics
from textgen import decode_step, load_draft, load_model, start_reply


class Loaded:
    """A model with its tokenizer and where it came from, and the speculative decoding of requests that name
    none (draft: '', 'ngram', or a draft model's out_dir, loaded here: draft is then 'model'). A reload
    replaces the whole object."""

    def __init__(self, init_from, out_dir, device, dtype, quantize='', draft=''):
        self.model, self.tokenizer, self.info = load_model(init_from, out_dir, device, dtype, quantize)
        self.draft_model = load_draft(draft, self.tokenizer, device, dtype, quantize) if draft not in ('', 'ngram') else None
        self.draft = 'model' if self.draft_model else draft
        self.init_from, self.out_dir, self.created = init_from, out_dir, int(time.time())
        self.device, self.dtype, self.quantize = device, dtype, quantize
        self.name = os.path.basename(os.path.abspath(out_dir)) if init_from == 'resume' else init_from

    def describe(self):
        cfg = self.model.config
        best = self.info.get('best_val_loss')  # a tensor in nanoGPT's checkpoints; JSON has no NaN
        best = float(best) if best is not None and math.isfinite(float(best)) else None
        return {'id': self.name, 'source': self.info.get('source'), 'init_from': self.init_from,
                'out_dir': self.out_dir if self.init_from == 'resume' else None,
                'parameters': self.info['parameters'], 'model_args': vars(cfg), 'config': self.info.get('config'),
                'iter_num': self.info.get('iter_num'), 'best_val_loss': best, 'tokenizer': self.tokenizer.name,
                'vocab_size': cfg.vocab_size, 'block_size': cfg.block_size, 'device': self.device,
                'dtype': self.dtype, 'quantize': self.quantize or None,
                # a chat model (its tokenizer renders turns): the page opens on its Chat tab
                'chat': '<|assistant_start|>' in self.tokenizer.special_tokens}


class Worker:
    """The thread that owns the model and its decode engine: requests (api.Request) wait in a queue for free
    rows, join the running batch between two steps and leave it when they end; a model load swaps the
    engine between steps. The engine's rows carry their request: row.request, row.choice and row.text
    (its TextStream). max_batch_size rows decode together, max_tokens_limit is the longest reply,
    max_waiting prompts may wait (past that a 429); seed is the stream of rows without their own; draft_tokens:
    the tokens a draft proposes per step, for requests that name no draft (the draft is the Loaded's)."""

    def __init__(self, loaded, max_batch_size=8, max_tokens_limit=1024, max_waiting=256, seed=1337,
                 prefix_cache_tokens=0, metrics=None, draft_tokens=4):
        self.max_batch_size, self.max_tokens_limit, self.max_waiting = max_batch_size, max_tokens_limit, max_waiting
        self.seed, self.prefix_cache_tokens, self.metrics = seed, prefix_cache_tokens, metrics or Metrics()
        self.draft_tokens = draft_tokens
        self.cond = threading.Condition()  # guards waiting, pending_load and closing
        self.waiting = deque()  # (request, prompt index)
        self.pending_load, self.closing = None, False
        self.stats = dict(peak_active_rows=0, steps=0, generated_tokens=0, completed=0, cancelled=0, failed=0,
                          restarts=0)
        self.use(loaded)
        self.thread = threading.Thread(target=self.run, name='model-worker')
        self.thread.start()

    def use(self, loaded):
        engine = Engine(loaded.model, self.max_batch_size, self.max_tokens_limit, loaded.tokenizer.n_vocab, self.seed,
                        prefix_cache_tokens=self.prefix_cache_tokens, draft_model=loaded.draft_model)
        self.loaded, self.engine = loaded, engine

    @property
    def draft(self):
        """The speculative decoding of requests that name none (serving/api.py's read_request)."""
        return dict(draft=self.loaded.draft, draft_tokens=self.draft_tokens)

    def submit(self, request=None, load=None):
        """Queue a request (from an HTTP thread), or with load=(Loaded, Event) switch models."""
        with self.cond:
            if self.closing:
                raise server_error("the server is shutting down", 'shutting_down', 503)
            if not self.alive():
                raise WORKER_STOPPED
            if load:
                self.pending_load = load
            elif len(self.waiting) + len(request.rows) > self.max_waiting:
                raise APIError("too many requests are waiting; try again later", status=429, code='busy',
                               kind='rate_limit_error')
            else:
                self.waiting.extend((request, i) for i in range(len(request.rows)))
            self.cond.notify()

    def status(self):
        return dict(self.stats, active_rows=len(self.engine.rows), waiting=len(self.waiting),
                    max_batch_size=self.max_batch_size, prefix_cache_tokens=self.engine.prefix_tokens_held())

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
                if not self.waiting or len(self.waiting[0][0].rows[0]) > self.max_batch_size - len(self.engine.rows):
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
                    self.metrics.add('nanogpt_prompt_tokens_total', len(rows[0].prompt))
                    self.metrics.add('nanogpt_prompt_tokens_cached_total', rows[0].cached_tokens)
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
            new = max(row.stepped, 1)  # a speculative run adds several (a beam search's row: its one)
            self.stats['generated_tokens'] += new
            self.metrics.add('nanogpt_generated_tokens_total', new)
            self.metrics.add('nanogpt_draft_tokens_proposed_total', row.drafted[0])
            self.metrics.add('nanogpt_draft_tokens_accepted_total', row.drafted[1])
            now, last = time.time(), getattr(row, 'last_token_at', None)
            if last is None:
                self.metrics.observe('nanogpt_time_to_first_token_seconds', now - request.arrived)
            else:
                self.metrics.observe('nanogpt_inter_token_latency_seconds', now - last)
            for _ in range(new - 1):  # the rest of a run came at the same moment
                self.metrics.observe('nanogpt_inter_token_latency_seconds', 0.0)
            row.last_token_at = now
            tokens, sampled = row.tokens[len(row.tokens) - new:], row.sampled[len(row.sampled) - new:]
            logprobs = []
            if row.logprobs is not None:  # a calculator's output is forced, not sampled: no logprobs of its own
                entries = iter(row.token_logprobs[len(row.token_logprobs) - sum(sampled):])
                logprobs = [(t, *next(entries)) for t, s in zip(tokens, sampled) if s]
                logprobs = [entry for entry in logprobs if entry[0] not in row.stop_tokens]
            if piece or logprobs:
                request.events.put(('text', row.choice, piece, logprobs))
            if row.finish_reason:
                reason = 'stop' if row.finish_reason == 'stop' else 'length'
                request.events.put(('done', row.choice, reason, len(row.tokens)))
                self.stats['completed'] += 1
