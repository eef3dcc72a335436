"""
Every request setting in every decode mode of serve.py: honoured (the output changes as the setting says)
or refused with a 400 that names both the mode's field and the setting. The table this checks is in
docs/serving.md ("Settings and modes").

One tiny chat model with nanochat's tool tokens, trained for a few steps in this process on a conversation
whose reply calls the calculator, serves all of it in this process: completions (sampled, greedy, beams,
a JSON grammar, n > 1, echo with logprobs, streamed) and the chat route, whose reply makes a calculator call.
"""
import json
import os
import pickle
import threading

import pytest
import torch

from checkpoint import write_checkpoint
from model import GPT, GPTConfig
from test_serve import raw
from tokenizer import chat_tokens, tokenizer_from_meta, train_bpe

pytestmark = pytest.mark.usefixtures('one_thread')
pytest.importorskip('llguidance')

CALL = [{'type': 'python', 'text': '12*3'}, {'type': 'python_output', 'text': '36'}, {'type': 'text', 'text': 'Answer: 36'}]
CONVERSATION = [('user', 'What is 12 * 3?'), ('assistant', CALL)]
PROMPT = 'The fox'
SCHEMA = {'type': 'json_schema', 'json_schema': {'name': 'yn', 'schema': {'enum': ['yes', 'no']}}}


@pytest.fixture(scope='module')
def url(tmp_path_factory):
    import serve
    from serving.metrics import Metrics
    from serving.runs import TrainRun
    from serving.worker import Loaded, Worker
    meta = train_bpe(['The quick brown fox jumps over the lazy dog. What is 12 * 3? Answer: 36. yes no "yes" '
                      '{"a": [1, 2]}\n' * 20], 300)
    tok = tokenizer_from_meta(meta)
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=96, bias=False, vocab_size=tok.n_vocab, dropout=0.0)
    model = GPT(config)
    # the reply (with its call) learned, so the chat route calls; by a margin of about one logit, so penalties show
    ids, mask = chat_tokens(tok, CONVERSATION)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.tensor([ids[:-1]]), torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:])]])
    for _ in range(15):
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp('matrix') / 'out'
    os.makedirs(out)
    write_checkpoint(out / 'ckpt.pt', {'model': model.state_dict(), 'model_args': dict(
        n_layer=1, n_head=2, n_embd=32, block_size=96, bias=False, vocab_size=tok.n_vocab, dropout=0.0),
        'iter_num': 1, 'config': {}})
    with open(out / 'meta.pkl', 'wb') as f:
        pickle.dump(meta, f)
    metrics = Metrics()  # the worker's counters on the server's /metrics, as serve.py's main wires them
    worker = Worker(Loaded('resume', str(out), 'cpu', 'float32'), max_batch_size=8, max_tokens_limit=200, metrics=metrics)
    httpd = serve.Server(('127.0.0.1', 0), TrainRun(serve.HERE, str(out)), [str(out)], worker, metrics)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}'
    httpd.shutdown()
    worker.close()


# each mode: (route, the request's fields); sampled modes carry a seed, so every run of a body is the same
MODES = {
    'sampling': ('/v1/completions', dict(prompt=PROMPT, temperature=1.0, seed=5, max_tokens=12)),
    'greedy': ('/v1/completions', dict(prompt=PROMPT, temperature=0, max_tokens=12)),
    'beams': ('/v1/completions', dict(prompt=PROMPT, temperature=0, best_of=3, n=2, max_tokens=12)),
    'grammar': ('/v1/completions', dict(prompt=PROMPT, temperature=1.0, seed=5, max_tokens=16, response_format={
        'type': 'json_schema', 'json_schema': {'name': 's', 'schema': {'type': 'string', 'maxLength': 10}}})),
    'tool calls': ('/v1/chat/completions', dict(messages=[{'role': 'user', 'content': 'What is 12 * 3?'}],
                                                temperature=0, max_tokens=30)),
    'n > 1': ('/v1/completions', dict(prompt=PROMPT, temperature=1.0, seed=5, n=3, max_tokens=12)),
    'echo/logprobs': ('/v1/completions', dict(prompt=PROMPT, temperature=1.0, seed=5, echo=True, logprobs=2,
                                              max_tokens=12)),
    'streaming': ('/v1/completions', dict(prompt=PROMPT, temperature=1.0, seed=5, stream=True, max_tokens=12)),
}
SAMPLED = {'sampling', 'grammar', 'n > 1', 'echo/logprobs', 'streaming'}


def ask(url, mode, **changes):
    """(status, answer): answer is the error's message, or dict(texts (generated text per choice), reasons,
    tokens (completion tokens), logprobs (per choice: None, or the entries))."""
    route, body = MODES[mode]
    body = {k: v for k, v in dict(body, **changes).items() if v is not None}
    chat = route.endswith('chat/completions')
    if not body.get('stream'):
        status, reply = raw(url, 'POST', route, body)
        if status != 200:
            return status, reply['error']['message']
        choices = reply['choices']
        texts = [c['message']['content'] if chat else c['text'] for c in choices]
        logprobs = [c['logprobs'] for c in choices]
        usage = reply['usage']['completion_tokens']
    else:
        import http.client
        host, port = url.removeprefix('http://').split(':')
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request('POST', route, json.dumps(body), {'Content-Type': 'application/json'})
        response = conn.getresponse()
        if response.status != 200:
            return response.status, json.loads(response.read())['error']['message']
        chunks = [json.loads(line[6:]) for line in response.read().decode().splitlines()
                  if line.startswith('data: {')]
        texts, logprobs, reasons = {}, {}, {}
        for c in chunks:
            for ch in c['choices']:
                texts[ch['index']] = texts.get(ch['index'], '') + ch['text']
                if ch.get('logprobs'):
                    logprobs.setdefault(ch['index'], []).extend(ch['logprobs']['tokens'])
                reasons[ch['index']] = ch['finish_reason'] or reasons.get(ch['index'])
        choices = [{'finish_reason': reasons[i]} for i in sorted(texts)]
        texts, logprobs = [texts[i] for i in sorted(texts)], [logprobs.get(i) for i in sorted(texts)]
        usage = None
    if body.get('echo'):
        texts = [t.removeprefix(body['prompt']) for t in texts]
    return 200, dict(texts=texts, reasons=[c['finish_reason'] for c in choices], tokens=usage, logprobs=logprobs)


def refused(status, message, mode_field, setting):
    return status == 400 and mode_field in message and setting in message


def check_max_tokens(url, mode, base):
    status, got = ask(url, mode, max_tokens=3)
    assert status == 200 and all(r in ('length', 'stop') for r in got['reasons'])
    rows = MODES[mode][1].get('best_of') or len(got['texts'])  # usage counts every row generated, as OpenAI's
    assert got['tokens'] is None or got['tokens'] <= 3 * rows
    assert all(len(t) <= len(b) for t, b in zip(got['texts'], base['texts']))


def check_stop(url, mode, base):
    text = base['texts'][0]
    stop = next((text[i:i + 2] for i in range(1, len(text) - 1) if text[i:i + 2].strip() and text[i:i + 2] not in PROMPT),
                None)
    if stop is None:  # a text too short to hold one (a grammar's "yes")
        stop = text[-1:]
    status, got = ask(url, mode, stop=[stop])
    assert status == 200 and not any(stop in t for t in got['texts']), (stop, got)
    if mode != 'beams':  # the same row, cut where its text reaches the stop string
        assert got['texts'][0] == text[:text.index(stop)] and got['reasons'][0] == 'stop', (stop, got)
    else:  # a beam that reaches it ends there: distinct choices, each cut before it
        assert len(set(got['texts'])) == len(got['texts']) and 'stop' in got['reasons'], got


def check_logit_bias(url, mode, base):
    tok = tokenizer_of(url)
    if mode == 'grammar':  # within what the grammar allows (a string): the biased token fills it
        n = tok.encode('n')[0]
        status, got = ask(url, mode, logit_bias={str(n): 100})
        assert status == 200 and got['texts'][0].count('n') >= base['texts'][0].count('n') + 5, (got, base)
        return
    target = tok.encode(' lazy')[0]
    status, got = ask(url, mode, logit_bias={str(target): 100})
    want = tok.decode([target]).strip()
    # a beam search ranks continuations: its best one starts so (transformers' sequence_bias does the same)
    starts = got['texts'][:1] if mode == 'beams' else got['texts']
    assert status == 200 and all(t.lstrip().startswith(want) for t in starts), (want, got)


def check_penalty(name, value):
    def check(url, mode, base):
        status, got = ask(url, mode, **{name: value})
        assert status == 200 and got['texts'] != base['texts'], (name, got, base)
    return check


def check_seed(url, mode, base):
    status, again = ask(url, mode)
    status2, other = ask(url, mode, seed=6)
    assert status == status2 == 200 and again['texts'] == base['texts']
    if mode in SAMPLED:
        assert other['texts'] != base['texts'] and ask(url, mode, seed=6)[1]['texts'] == other['texts']
    else:  # greedy decoding draws nothing: the seed changes nothing
        assert other['texts'] == base['texts']


def check_filter(name, value):
    def check(url, mode, base):
        status, got = ask(url, mode, **{name: value})
        if mode == 'beams':
            assert refused(status, got, 'best_of', name), got
            return
        # keeping only the most likely token is greedy decoding
        assert status == 200 and got['texts'] == ask(url, mode, temperature=0)[1]['texts'], (name, got)
    return check


def check_logprobs(url, mode, base):
    chat = MODES[mode][0].endswith('chat/completions')
    status, got = ask(url, mode, **(dict(logprobs=True, top_logprobs=2) if chat else dict(logprobs=2)))
    if mode == 'beams':
        assert refused(status, got, 'best_of', 'logprobs'), got
        return
    assert status == 200 and all(lp for lp in got['logprobs']), got
    if not chat and mode != 'streaming':
        assert all(1 <= len(lp['top_logprobs'][-1]) <= 2 for lp in got['logprobs'])  # keyed by text: two may read alike
    if mode == 'tool calls':  # the calculator's output is not the model's: it has no logprobs entries
        entries = [e['token'] for e in got['logprobs'][0]['content']]
        assert '36' not in ''.join(entries[entries.index('<|output_start|>'):]) if '<|output_start|>' in entries else True


def check_response_format(url, mode, base):
    status, got = ask(url, mode, response_format=SCHEMA)
    if mode == 'beams':
        assert refused(status, got, 'best_of', 'response_format'), got
        return
    assert status == 200 and all(json.loads(t) in ('yes', 'no') for t in got['texts']), got


def draft_counts(url):
    """(proposed, accepted) draft tokens so far, from /metrics."""
    import urllib.request
    text = urllib.request.urlopen(url + '/metrics', timeout=30).read().decode()
    value = lambda name: int(next(l.split()[-1] for l in text.splitlines() if l.startswith(name + ' ')))  # noqa: E731,E741
    return value('nanogpt_draft_tokens_proposed_total'), value('nanogpt_draft_tokens_accepted_total')


def check_draft(url, mode, base):
    before = draft_counts(url)
    status, got = ask(url, mode, draft='ngram', draft_tokens=3)
    if mode in ('beams', 'grammar'):  # a beam search ranks whole beams; a grammar would have to pass each proposal
        assert refused(status, got, 'best_of' if mode == 'beams' else 'response_format', 'draft'), got
        return
    assert status == 200 and len(got['texts']) == len(base['texts']), got
    assert draft_counts(url)[0] > before[0]  # it proposed (and /metrics counts it)
    if mode in SAMPLED:  # another draw of the same distribution: seeded, it repeats
        assert ask(url, mode, draft='ngram', draft_tokens=3)[1]['texts'] == got['texts']
    else:  # greedy: the tokens plain decoding gives
        assert got['texts'] == base['texts'], (got, base)
    if mode == 'echo/logprobs':
        assert all(lp and len(lp['tokens']) == len(lp['token_logprobs']) for lp in got['logprobs'])


SETTINGS = {
    'max_tokens': check_max_tokens, 'stop': check_stop, 'logit_bias': check_logit_bias,
    'repetition_penalty': check_penalty('repetition_penalty', 5.0),
    'presence_penalty': check_penalty('presence_penalty', 2.0),
    'frequency_penalty': check_penalty('frequency_penalty', 2.0), 'seed': check_seed,
    'top_k': check_filter('top_k', 1), 'top_p': check_filter('top_p', 1e-9), 'logprobs': check_logprobs,
    'response_format': check_response_format, 'draft': check_draft,
}
_tokenizers = {}


def tokenizer_of(url):
    if url not in _tokenizers:
        status, info = raw(url, 'GET', '/api/model')
        with open(os.path.join(info['out_dir'], 'meta.pkl'), 'rb') as f:
            _tokenizers[url] = tokenizer_from_meta(pickle.load(f))
    return _tokenizers[url]


@pytest.mark.parametrize('setting', SETTINGS)
@pytest.mark.parametrize('mode', MODES)
def test_every_setting_in_every_mode_is_honoured_or_refused(url, mode, setting):
    status, base = ask(url, mode)
    assert status == 200, base
    SETTINGS[setting](url, mode, base)


def test_the_chat_mode_calls_the_calculator(url):
    status, got = ask(url, 'tool calls')
    assert status == 200 and '36' in got['texts'][0], got


def test_grammar_faults_reach_the_client(url):
    """A schema that cannot start is a 400 before any row starts; one that fails while writing is a 500 (or,
    streamed, an error event): never a 200 with broken JSON, never the grammar engine's state in a message."""
    tok = tokenizer_of(url)
    fmt = lambda schema: {'type': 'json_schema', 'json_schema': {'name': 'x', 'schema': schema}}  # noqa: E731
    for schema in ({'$ref': '#'}, False):
        status, message = ask(url, 'sampling', response_format=fmt(schema))
        assert status == 400 and 'response_format' in message and '\n' not in message, message
    status, got = ask(url, 'sampling', response_format=fmt(True), max_tokens=40)
    assert status == 200 and got['texts'][0].lstrip().startswith('{'), got
    pattern = {'type': 'string', 'pattern': '^((((a{1,50}){1,50}){1,50}){1,50})$'}
    bias = {str(tok.encode('"')[0]): -50, str(tok.encode('a')[0]): 50}
    status, message = ask(url, 'sampling', response_format=fmt(pattern), logit_bias=bias, max_tokens=60)
    assert status == 500 and 'grammar' in message and '\n' not in message and 'Parser' not in message, message
    import http.client
    host, port = url.removeprefix('http://').split(':')
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request('POST', '/v1/completions', json.dumps(dict(prompt=PROMPT, stream=True, max_tokens=60, logit_bias=bias,
                                                            response_format=fmt(pattern))))
    events = [json.loads(line[6:]) for line in conn.getresponse().read().decode().splitlines()
              if line.startswith('data: {')]
    assert 'error' in events[-1] and 'grammar' in events[-1]['error']['message'], events[-1]
    assert not any(c.get('finish_reason') == 'stop' for e in events for c in e.get('choices', []))
