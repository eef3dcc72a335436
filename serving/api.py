"""
OpenAI's protocol, as serve.py speaks it: a request's JSON read into engine rows (read_prompts,
read_request), the worker's events shaped into OpenAI's answers (Completion: one body, or the chunks of
a stream), logprobs, llama-server's /tokenize and /detokenize, /v1/embeddings, and errors in OpenAI's
shape (APIError). No HTTP here: serve.py's handler reads the bytes and writes what this returns; the
limits it checks against are passed in.
"""
import base64
import json
import math
import queue
import re
import struct
import time
import uuid

from engine import Row, SettingError, beam_rows, embed
from grammar import FormatError, json_grammar
from textgen import BEAM_SETTINGS, stop_key, stop_tokens_of
from tokenizer import CHAT_ROLES, render_chat, reply_content

MAX_STOP = 4  # stop strings a request may give, as OpenAI's API


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


class Request:
    """One API call: rows[i] are the n engine rows (the "choices") of prompt i, made and checked by the HTTP
    thread for the model `loaded` (serving/worker.py's Loaded). The worker reports through `events`: with echo first ('prompt', choice,
    logprobs of the prompt's tokens), then ('text', choice, piece, logprobs) and ('done', choice, finish_reason,
    n_tokens), or ('error', APIError). logprobs: [(token, logprob, [(id, logprob) of the top alternatives])]."""

    def __init__(self, loaded, rows, stop, echo=False):
        self.loaded, self.rows, self.stop, self.echo = loaded, rows, stop, echo
        self.events = queue.Queue()
        self.cancelled = False  # set by the HTTP thread when its client has gone
        self.failed = False  # it got its error: its prompts still waiting are dropped
        self.arrived = time.time()  # for the time-to-first-token histogram

class Completion:
    """One /v1/completions or /v1/chat/completions call: its Request for the worker, and its answer made
    from the worker's events, one JSON body or, with stream=true, the chunks of server-sent events."""

    def __init__(self, loaded, body, chat, max_batch_size, max_tokens_limit, draft=None):
        prompts, self.prompt_texts, chat_stop = read_prompts(body, loaded.tokenizer, chat, max_batch_size)
        echo = not chat and flag(body, 'echo')
        rows, self.how = read_request(body, prompts, loaded.tokenizer, 256 if chat else 16, chat, max_batch_size,
                                      max_tokens_limit, echo, draft)
        self.request = Request(loaded, rows, self.how['stop'] + chat_stop, echo)
        self.loaded, self.chat, self.stream, self.rows = loaded, chat, self.how['stream'], rows
        self.per = self.how['best_of']  # rows per prompt: n, or best_of to pick n from
        n = len(rows) * self.per
        self.meta = dict(id=('chatcmpl-' if chat else 'cmpl-') + uuid.uuid4().hex, created=int(time.time()),
                         model=loaded.name, object=('chat.completion' if chat else 'text_completion') +
                         ('.chunk' if chat and self.stream else ''))
        self.texts, self.logprobs, self.reasons = [''] * n, [[] for _ in range(n)], [None] * n
        self.offsets = [0 if echo else len(loaded.tokenizer.decode(rows[i // self.per][0].prompt)) for i in range(n)]
        self.usage = dict(prompt_tokens=sum(len(r[0].prompt) for r in rows), completion_tokens=0)
        self.failed = False

    @property
    def finished(self):
        return self.failed or None not in self.reasons

    def choice(self, i, text, entries, finish_reason):
        lp = logprobs_json(self.loaded.tokenizer, entries, self.chat, self.offsets[i]) \
            if self.how['logprobs'] is not None else None
        if not self.chat:
            return dict(index=i, text=text, logprobs=lp, finish_reason=finish_reason)
        if self.stream:
            return dict(index=i, delta={'content': text} if text else {}, logprobs=lp, finish_reason=finish_reason)
        return dict(index=i, message=dict(role='assistant', content=text), logprobs=lp, finish_reason=finish_reason)

    def opening(self):
        """A chat stream's first chunks: each choice's role."""
        delta = {'role': 'assistant', 'content': ''}
        return [dict(self.meta, choices=[dict(index=i, delta=delta, logprobs=None, finish_reason=None)])
                for i in range(len(self.texts) if self.chat and self.stream else 0)]

    def take(self, event):
        """Take one of the worker's events (Request says which); the stream chunks it makes. An error ends a
        stream with an error chunk, and is raised for a request that is not streamed."""
        if event[0] == 'error':
            if not self.stream:
                raise event[1]
            self.failed = True
            return [event[1].body()]
        kind, i = event[:2]
        if kind == 'done':
            piece, entries, self.reasons[i] = '', [], event[2]
            self.usage['completion_tokens'] += event[3]
        else:  # with echo, the prompt's text and tokens come first
            piece, entries = (self.prompt_texts[i // self.per], event[2]) if kind == 'prompt' else event[2:]
            if self.chat and not self.texts[i]:
                piece = piece.lstrip()  # a chat reply starts after "Assistant:" without its space
            self.texts[i] += piece
            self.logprobs[i] += entries
        if not self.stream:
            return []
        chunk = dict(self.meta, choices=[self.choice(i, piece, entries, self.reasons[i])])
        self.offsets[i] += len(piece)  # a chunk's text_offset continues the one before
        return [chunk]

    def finish_usage(self):
        self.usage['total_tokens'] = self.usage['prompt_tokens'] + self.usage['completion_tokens']
        self.usage['prompt_tokens_details'] = {'cached_tokens': sum(r[0].cached_tokens for r in self.rows)}

    def body(self):
        """The answer of a request that is not streamed: its n best choices per prompt."""
        self.finish_usage()
        picked = [i for p in range(len(self.rows)) for i in best(range(p * self.per, (p + 1) * self.per),
                                                                  self.logprobs, self.how)]
        return dict(self.meta, usage=self.usage, choices=[
            dict(self.choice(i, self.texts[i], self.logprobs[i], self.reasons[i]), index=k) for k, i in enumerate(picked)])

    def closing(self):
        """A stream's last chunk before [DONE]: the usage, when stream_options asked for it."""
        self.finish_usage()
        return [dict(self.meta, choices=[], usage=self.usage)] if not self.failed and self.how['include_usage'] else []


ROW_SETTINGS = ('max_tokens', 'temperature', 'top_p', 'top_k', 'repetition_penalty', 'presence_penalty',
                'frequency_penalty', 'seed', 'logit_bias', 'draft', 'draft_tokens')


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


def read_prompts(body, tokenizer, chat, max_batch_size):
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


def read_request(body, prompts, tokenizer, default_max_tokens, chat, max_batch_size, max_tokens_limit, echo=False,
                 draft=None):
    """The engine rows of a completion or chat request, n per prompt (the seed of choice c is seed + c, so each
    samples on its own), and how to answer. Row checks the sampling settings; fields this server does not know
    are ignored, as OpenAI's server ignores them. logprobs: completions take 0..5 alternatives, chat takes
    logprobs=true and top_logprobs 0..20. draft: the server's speculative decoding ({'draft', 'draft_tokens'}),
    for requests that name none and where it applies (not a beam search or a grammar, which refuse a draft named)."""
    row = {k: body[k] for k in ROW_SETTINGS if body.get(k) is not None}
    asked = 'draft' in row
    row = dict(draft or {}, **row)
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
    if not asked and (beams or make is not None):  # the server's default draft goes where it applies
        row.pop('draft', None)
    try:
        if beams:  # greedy: the sampling filters and a sampled row's extras do not apply; refused, not ignored
            for name, unset in (('response_format', make is None), ('logprobs', row['logprobs'] is None),
                                ('top_k', row.get('top_k', 0) == 0), ('top_p', row.get('top_p', 1.0) == 1.0),
                                ('draft', not row.get('draft'))):
                require(unset, f"best_of with temperature 0 (a beam search) takes no {name}", name)
            kept = {k: v for k, v in row.items() if k in BEAM_SETTINGS}
            rows = [beam_rows(p, best_of, row['max_tokens'], stop_tokens_of(tokenizer), stop_key(tokenizer, stop),
                              **kept) for p in prompts]
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


def best(choices, logprobs, how):
    """The n of a prompt's choices to answer with: all of them, or with best_of the n best: the first
    n beams of a beam search (ranked already), else the highest mean log probability per token."""
    if how['best_of'] == how['n'] or how['beams']:
        return list(choices)[:how['n']]
    mean = lambda i: sum(e[1] for e in logprobs[i]) / len(logprobs[i]) if logprobs[i] else float('-inf')  # noqa: E731
    return sorted(choices, key=lambda i: -mean(i))[:how['n']]
