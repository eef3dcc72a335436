"""
serve.py's llama-server-like extras, as a user meets them: /health 503 while the model loads,
response_format through the official openai client, /tokenize, /detokenize, /v1/embeddings,
best_of, the prefix cache in usage, and /metrics counters moving as requests go through.
"""
import json
import os
import pickle
import re
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import REPO
from engine import Engine, beam_rows
from model import GPT, GPTConfig

openai = pytest.importorskip('openai')
jsonschema = pytest.importorskip('jsonschema')
pytest.importorskip('llguidance')

CHARS = sorted(set("System: User: Assistant: the quick brown fox jumps over the lazy dog.\n"
                   '{}[]":,-0123456789'))
SCHEMA = {'type': 'object', 'required': ['name', 'n'], 'additionalProperties': False,
          'properties': {'name': {'type': 'string', 'maxLength': 5}, 'n': {'type': 'integer', 'minimum': 0, 'maximum': 9}}}


def model_args():
    return dict(n_layer=2, n_head=2, n_embd=32, block_size=256, bias=False, vocab_size=len(CHARS), dropout=0.0)


def raw(url, method, path, body=None):
    import http.client
    host, port = url.removeprefix('http://').split(':')
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request(method, path, body=None if body is None else json.dumps(body))
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


@pytest.fixture(scope='module')
def api(tmp_path_factory):
    """serve.py on a checkpoint whose meta.pkl is a pipe: loading the model waits until the test
    writes the tokenizer into it, so /health is seen answering 503 while the model loads."""
    out_dir = tmp_path_factory.mktemp('api')
    torch.manual_seed(0)
    model = GPT(GPTConfig(**model_args()))
    torch.save({'model': model.state_dict(), 'model_args': model_args(), 'iter_num': 0, 'config': {}},
               out_dir / 'ckpt.pt')
    os.mkfifo(out_dir / 'meta.pkl')
    log_path = out_dir / 'serve.log'
    proc = subprocess.Popen([sys.executable, 'serve.py', f'--out_dir={out_dir}', '--port=0', '--device=cpu',
                             '--dtype=float32', '--max_batch_size=4', '--prefix_cache_tokens=2000'], cwd=REPO,
                            stdout=open(log_path, 'w'), stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1'))

    def wait_for(pattern):
        deadline = time.time() + 120
        while time.time() < deadline:
            match = re.search(pattern, log_path.read_text())
            if match:
                return match
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in the log:\n{log_path.read_text()}")
    try:
        url = wait_for(r'listening on (http://[\d.]+:\d+)').group(1)
        loading = [raw(url, 'GET', '/health'), raw(url, 'POST', '/v1/completions', {'prompt': 'the'})]
        with open(out_dir / 'meta.pkl', 'wb') as f:  # the tokenizer arrives: the load goes on
            pickle.dump({'vocab_size': len(CHARS), 'stoi': {c: i for i, c in enumerate(CHARS)},
                         'itos': dict(enumerate(CHARS))}, f)
        wait_for(r'serving .* on http://')
        yield url, loading, model.eval()
    finally:
        proc.terminate()
        proc.wait(30)


def client(url):
    return openai.OpenAI(base_url=url + '/v1', api_key='unused', max_retries=0, timeout=120)


def test_health_is_503_while_the_model_loads(api):
    url, loading, _ = api
    for status, body in loading:
        assert status == 503 and json.loads(body)['error']['code'] == 'loading'
    status, body = raw(url, 'GET', '/health')
    assert status == 200 and json.loads(body)['status'] == 'ok'


def test_response_format_through_the_openai_client(api):
    c = client(api[0])
    schema_format = {'type': 'json_schema', 'json_schema': {'name': 'thing', 'schema': SCHEMA}}
    free = []  # a free request decoding at the same time as the constrained ones
    thread = threading.Thread(target=lambda: free.append(c.completions.create(
        model='m', prompt='the', max_tokens=60, seed=1)))
    thread.start()
    r = c.chat.completions.create(model='m', messages=[{'role': 'user', 'content': 'a dog'}], max_tokens=200,
                                  n=2, seed=3, response_format=schema_format)
    for choice in r.choices:
        assert choice.finish_reason == 'stop'
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    r = c.completions.create(model='m', prompt='{', max_tokens=200, seed=4,
                             extra_body={'response_format': {'type': 'json_object'}})
    assert isinstance(json.loads(r.choices[0].text), dict)
    thread.join(60)
    assert len(free[0].choices[0].text) == 60
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model='m', messages=[{'role': 'user', 'content': 'a'}], response_format={
            'type': 'json_schema', 'json_schema': {'name': 'x', 'schema': {'not': {'type': 'string'}}}})
    assert e.value.body['param'] == 'response_format' and 'not' in e.value.body['message']


def test_tokenize_and_detokenize(api):
    url = api[0]
    status, body = raw(url, 'POST', '/tokenize', {'content': 'the fox'})
    tokens = json.loads(body)['tokens']
    assert status == 200 and tokens == [CHARS.index(c) for c in 'the fox']
    status, body = raw(url, 'POST', '/detokenize', {'tokens': tokens})
    assert status == 200 and json.loads(body) == {'content': 'the fox'}
    for path, body, param in [('/tokenize', {'content': 5}, 'content'), ('/tokenize', {'content': 'é'}, 'content'),
                              ('/detokenize', {'tokens': [len(CHARS)]}, 'tokens')]:
        status, answer = raw(url, 'POST', path, body)
        assert status == 400 and json.loads(answer)['error']['param'] == param


def test_embeddings_are_the_mean_last_hidden_state(api):
    url, _, model = api
    c = client(url)
    r = c.embeddings.create(model='m', input=['the fox', 'dog'])  # the client asks for base64
    floats = c.embeddings.create(model='m', input='the fox', encoding_format='float')
    with torch.no_grad():
        want = model.hidden_states(torch.tensor([[CHARS.index(ch) for ch in 'the fox']]))[0].mean(0)
    assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens == 10
    assert torch.allclose(torch.tensor(r.data[0].embedding), want, atol=1e-5)
    assert torch.allclose(torch.tensor(floats.data[0].embedding), want, atol=1e-5)
    status, _ = raw(url, 'POST', '/v1/embeddings', {'input': 'x' * 300})
    assert status == 400


def test_best_of(api):
    url, _, model = api
    c = client(url)
    # sampled: the best of 3 by mean log probability per token, among the 3 that n=3 returns with the same seed
    best = c.completions.create(model='m', prompt='the', max_tokens=12, seed=7, best_of=3, temperature=1.0)
    three = c.completions.create(model='m', prompt='the', max_tokens=12, seed=7, n=3, logprobs=0, temperature=1.0)
    mean = lambda ch: sum(ch.logprobs.token_logprobs) / len(ch.logprobs.token_logprobs)  # noqa: E731
    assert len(best.choices) == 1 and best.choices[0].text == max(three.choices, key=mean).text
    assert best.usage.completion_tokens == 36  # every candidate counts
    # greedy: a beam search, its n best beams
    beams = c.completions.create(model='m', prompt='the', max_tokens=12, best_of=3, n=2, temperature=0)
    engine = Engine(model, 3, 12)
    rows = beam_rows([CHARS.index(ch) for ch in 'the'], 3, 12)
    engine.add(rows)
    while engine.rows:
        engine.step()
    assert [ch.text for ch in beams.choices] == [''.join(CHARS[t] for t in r.tokens) for r in rows[:2]]
    for body in [dict(best_of=2, n=3), dict(best_of=2, stream=True), dict(best_of=99)]:
        status, answer = raw(url, 'POST', '/v1/completions', dict(prompt='the', **body))
        assert status == 400 and json.loads(answer)['error']['param'] == 'best_of'


def metric(text, name):
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_metrics_move_and_the_prefix_cache_is_used(api):
    url = api[0]
    c = client(url)
    before = raw(url, 'GET', '/metrics')[1].decode()
    prompt = 'the quick brown fox jumps over the lazy dog. ' * 3
    first = c.completions.create(model='m', prompt=prompt, max_tokens=20, temperature=0)
    again = c.completions.create(model='m', prompt=prompt + first.choices[0].text + ' the', max_tokens=20,
                                 temperature=0)
    status, after = raw(url, 'GET', '/metrics')
    after = after.decode()
    assert status == 200 and '# TYPE nanogpt_time_to_first_token_seconds histogram' in after
    grew = lambda name: metric(after, name) - metric(before, name)  # noqa: E731
    route = 'nanogpt_requests_total{route="/v1/completions",status="200"}'
    assert grew(route) == 2
    assert grew('nanogpt_generated_tokens_total') == 40
    assert grew('nanogpt_prompt_tokens_total') == len(prompt) * 2 + 20 + 4
    # the second prompt resends the first and its reply: the first's whole prefill chunks (64 tokens) are reused
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in (first, again)]
    assert cached[1] == (len(prompt) - 1) // 64 * 64 == 128 and sum(cached) == grew('nanogpt_prompt_tokens_cached_total')
    assert grew('nanogpt_time_to_first_token_seconds_count') == 2
    assert grew('nanogpt_inter_token_latency_seconds_count') == 38
    assert 'nanogpt_rows_running 0' in after and 'nanogpt_requests_waiting 0' in after
    # the cache gives what the model gives without it
    plain = c.completions.create(model='m', prompt=prompt + first.choices[0].text + ' the', max_tokens=20,
                                 temperature=0, extra_body={'top_k': 0})
    assert plain.choices[0].text == again.choices[0].text
