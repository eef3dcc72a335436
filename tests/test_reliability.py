"""
Hostile use, as a careless user or a hostile client would try it: nothing kills the server,
corrupts a checkpoint, deletes data, or ends in a traceback where one line belongs. The model
worker survives faults outside any request, and says so when it cannot. Tiny models, CPU.
"""
import json
import os
import pickle
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from conftest import REPO, SHARED, run_script
from test_serve import MAX_BODY, client, health, project_dataset, raw, server, stop_server  # noqa: F401
from test_serve import tiny_run_overrides, write_checkpoint

TINY_TRAIN = ['--device=cpu', '--compile=False', '--dtype=float32', '--n_layer=1', '--n_head=2', '--n_embd=16',
              '--block_size=16', '--batch_size=4', '--eval_iters=2', '--log_interval=1', '--warmup_iters=0',
              '--dataset=tiny', '--gradient_accumulation_steps=1']


def one_line_error(proc):
    """Exit 1 with one 'error: ...' line last (after the usual notes: the dtype, the tokenizer) and no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith('error: ') and sum(line.startswith('error') for line in lines) == 1, proc.stderr[-3000:]
    return lines[-1]


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """A folder with data/tiny/ (a char dataset, written directly) for train.py runs."""
    root = tmp_path_factory.mktemp('reliability')
    folder = root / 'data' / 'tiny'
    folder.mkdir(parents=True)
    text = "the quick brown fox jumps over the lazy dog. " * 200
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text], dtype=np.uint16)
    ids[:8000].tofile(folder / 'train.bin')
    ids[8000:].tofile(folder / 'val.bin')
    with open(folder / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': len(chars), 'stoi': {c: i for i, c in enumerate(chars)},
                     'itos': dict(enumerate(chars))}, f)
    return root


def train(workdir, *args, check=True):
    return run_script(REPO / 'train.py', *TINY_TRAIN, *args, cwd=workdir, check=check,
                      env={'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1'})


# -----------------------------------------------------------------------------
# the engine's worker: one ordinary request used to kill it for good

def test_a_stop_string_with_a_penalty_keeps_the_server_serving(server):
    """A row that ends on a stop string while a penalty table exists (rows leave outside the engine's step)."""
    for body, stops in [(dict(prompt='the', max_tokens=50, n=2, stop='e', frequency_penalty=0.5, seed=1), 'e'),
                        (dict(prompt='the', max_tokens=30, n=3, stop=['o', 'x'], logit_bias={'3': 5}, seed=2), 'ox')]:
        status, reply = raw(server, 'POST', '/v1/completions', body)
        assert status == 200 and not any(s in c['text'] for c in reply['choices'] for s in stops), reply
    assert client(server).completions.create(model='x', prompt='a', max_tokens=5).choices[0].text
    assert health(server)['restarts'] == 0


def test_sample_cli_stop_with_a_penalty(tmp_path):
    out_dir = write_checkpoint(tmp_path / 'out')
    proc = run_script('sample.py', f'--out_dir={out_dir}', '--device=cpu', '--num_samples=2', '--max_new_tokens=50',
                      '--stop=e', '--repetition_penalty=1.3', '--start=the', env={'OMP_NUM_THREADS': '1'})
    assert proc.stdout.count('---------------') == 2


def in_process_server(loaded, root=str(REPO)):
    """serve.py's worker and HTTP server in this process, so faults can be injected into them; the page's runs
    write under `root`, and models load from there."""
    import serve
    from serving.runs import TrainRun
    from serving.worker import Worker
    httpd = serve.Server(('127.0.0.1', 0), TrainRun(serve.HERE, root), [root], Worker(loaded, prefix_cache_tokens=4096))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f'http://127.0.0.1:{httpd.server_address[1]}'


def loaded_model(out_dir):
    from serving.worker import Loaded
    return Loaded('resume', out_dir, 'cpu', 'auto')


def test_a_fault_outside_any_request_fails_what_ran_and_the_worker_goes_on(tmp_path, monkeypatch, one_thread):
    import serving.worker
    loaded = loaded_model(write_checkpoint(tmp_path / 'out'))
    decode_step, faults = serving.worker.decode_step, []

    def faulty(engine):  # a bug in the worker's own code, once, while a request runs
        if not faults:
            faults.append(1)
            raise RuntimeError("injected")
        return decode_step(engine)
    monkeypatch.setattr(serving.worker, 'decode_step', faulty)
    httpd, url = in_process_server(loaded)
    try:
        status, reply = raw(url, 'POST', '/v1/completions', dict(prompt='the', max_tokens=20, n=2))
        assert status == 500 and 'internal error' in reply['error']['message']
        status, reply = raw(url, 'POST', '/v1/completions', dict(prompt='the', max_tokens=20, n=2))
        assert status == 200 and [len(c['text']) for c in reply['choices']] == [20, 20]
        assert health(url)['restarts'] == 1 and health(url)['active_rows'] == 0
    finally:
        httpd.shutdown()
        httpd.worker.close()


@pytest.mark.filterwarnings('ignore::pytest.PytestUnhandledThreadExceptionWarning')  # the worker's end, on purpose
def test_a_worker_that_cannot_go_on_is_reported_not_silent(tmp_path, monkeypatch, one_thread):
    """When even a fresh engine cannot be made, the worker thread ends: /health answers 503, a waiting
    request gets its 503 at once, and so does every new one."""
    import serving.worker
    loaded = loaded_model(write_checkpoint(tmp_path / 'out'))
    httpd, url = in_process_server(loaded)
    worker = httpd.worker
    try:
        def broken(*args):
            raise MemoryError("injected")
        monkeypatch.setattr(serving.worker, 'decode_step', lambda engine: broken())
        monkeypatch.setattr(worker, 'use', broken)
        t0 = time.time()
        status, reply = raw(url, 'POST', '/v1/completions', dict(prompt='the', max_tokens=20))
        assert status == 503 and reply['error']['code'] == 'worker_stopped' and time.time() - t0 < 10
        worker.thread.join(10)
        status, body = raw(url, 'GET', '/health')
        assert status == 503 and body['status'] == 'error'
        assert raw(url, 'POST', '/v1/chat/completions', dict(messages=[{'role': 'user', 'content': 'hi'}]))[0] == 503
    finally:
        httpd.shutdown()
        worker.close()


# -----------------------------------------------------------------------------
# request fields: non-finite numbers and wrong types are 400s naming the field; no NaN in a response

@pytest.mark.parametrize('text, param', [
    ('"temperature": 1e999', 'temperature'), ('"repetition_penalty": 1e999', 'repetition_penalty'),
    ('"top_p": -1e999', 'top_p'), ('"seed": "5"', 'seed'), ('"seed": [1]', 'seed'), ('"seed": {}', 'seed'),
    ('"seed": -1', 'seed'), ('"top_k": 9223372036854775808', 'top_k'), ('"max_tokens": 1e999', 'max_tokens'),
    ('"stop": {}', 'stop'), ('"stop": 0', 'stop'), ('"stop": false', 'stop'), ('"presence_penalty": 1e999', 'presence_penalty'),
    ('"logit_bias": {"3": 1e999}', 'logit_bias')])
def test_non_finite_and_mistyped_fields_are_400s_naming_them(server, text, param):
    for path, prompt in [('/v1/completions', '"prompt": "the"'),
                         ('/v1/chat/completions', '"messages": [{"role": "user", "content": "the"}]')]:
        status, reply = raw(server, 'POST', path, ('{' + prompt + ', ' + text + '}').encode())
        assert status == 400 and reply['error']['param'] == param, (path, text, reply)


def test_max_completion_tokens_zero_is_refused(server):
    status, reply = raw(server, 'POST', '/v1/chat/completions',
                        dict(messages=[{'role': 'user', 'content': 'the'}], max_completion_tokens=0))
    assert status == 400 and reply['error']['param'] == 'max_tokens'
    status, reply = raw(server, 'POST', '/v1/chat/completions',
                        dict(messages=[{'role': 'user', 'content': 'the'}], max_completion_tokens=3))
    assert status == 200 and reply['usage']['completion_tokens'] <= 3


def test_a_body_over_the_limit_gets_a_413_the_client_can_read(server):
    request = urllib.request.Request(server + '/v1/completions', data=b'{"prompt": "' + b'a' * (100 * MAX_BODY) + b'"}',
                                     headers={'Content-Type': 'application/json'})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 413 and str(MAX_BODY) in json.loads(e.value.read())['error']['message']


# -----------------------------------------------------------------------------
# a server of its own (train_root is this test's folder): the training API, model loads, a NaN model

@pytest.fixture(scope='module')
def own_server(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp('own-server')
    out_dir = write_checkpoint(tmp_path / 'out-start')
    proc = subprocess.Popen([sys.executable, 'serve.py', f'--out_dir={out_dir}', '--port=0', '--device=cpu',
                             '--dtype=float32', f'--train_root={tmp_path / "runs"}'], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1'))
    for line in proc.stdout:
        match = re.search(r'serving .* on (http://[\d.]+:\d+)', line)
        if match:
            break
    else:
        raise AssertionError("serve.py did not start")
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe drained
    yield proc, match.group(1), tmp_path
    stop_server(proc)


def peak_rss(pid):
    with open(f'/proc/{pid}/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))


def test_model_load_checks_shapes_before_allocating_and_stays_under_its_roots(own_server):
    proc, url, tmp_path = own_server
    evil = tmp_path / 'runs' / 'evil'
    evil.mkdir(parents=True)
    # 1 KB on disk; the model its model_args describe would take ~20 GB
    torch.save({'model': {}, 'model_args': dict(n_layer=24, n_head=32, n_embd=4096, block_size=1024, vocab_size=50304,
                                                bias=False), 'iter_num': 1}, evil / 'ckpt.pt')
    before = peak_rss(proc.pid)
    status, reply = raw(url, 'POST', '/api/model/load', {'out_dir': str(evil)})
    assert status == 400 and 'do not fit' in reply['error']['message'], reply
    assert peak_rss(proc.pid) - before < 200e6
    # nothing outside the server's roots is loaded, nor does the answer tell whether a checkpoint is there
    elsewhere = write_checkpoint(tmp_path / 'elsewhere')
    answers = [raw(url, 'POST', '/api/model/load', {'out_dir': path}) for path in
               (elsewhere, str(tmp_path / 'nothing-here'), '/etc', str(tmp_path / 'runs' / '..' / 'elsewhere'))]
    assert {status for status, _ in answers} == {403}
    assert len({reply['error']['message'] for _, reply in answers}) == 1
    assert raw(url, 'POST', '/api/model/load', {'out_dir': str(tmp_path / 'runs' / 'none')})[0] == 404
    assert health(url)['model'] == 'out-start'


def test_a_nan_model_answers_logprobs_as_null(own_server):
    proc, url, tmp_path = own_server
    out = write_checkpoint(tmp_path / 'runs' / 'out-nan')
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    ckpt['model'] = {k: torch.full_like(v, float('nan')) for k, v in ckpt['model'].items()}
    torch.save(ckpt, os.path.join(out, 'ckpt.pt'))
    assert raw(url, 'POST', '/api/model/load', {'out_dir': out})[0] == 200
    body = json.dumps(dict(prompt='the', max_tokens=3, logprobs=2, echo=True)).encode()
    reply = urllib.request.urlopen(urllib.request.Request(url + '/v1/completions', body), timeout=60).read()

    def refuse(name):
        raise AssertionError(f"{name} in a response")
    reply = json.loads(reply, parse_constant=refuse)  # strict JSON: no NaN, no Infinity
    assert reply['choices'][0]['logprobs']['token_logprobs'][1:] == [None] * 5
    assert raw(url, 'POST', '/api/model/load', {'out_dir': str(tmp_path / 'out-start')})[0] == 200


def test_the_training_api_writes_only_under_train_root(own_server):
    proc, url, tmp_path = own_server
    status, reply = raw(url, 'POST', '/api/train/start', {'config': 'train_shakespeare_char_cpu.py',
                                                          'overrides': ['--n_layer=1000', '--n_embd=16384']})
    assert status == 400 and re.search(r'about [\d.]+ GB to train', reply['error']['message']), reply
    with project_dataset() as dataset:
        # no out_dir override: the config's own out_dir ('out-shakespeare-char') goes under train_root
        overrides = [o for o in tiny_run_overrides(dataset, 'unused', max_iters=3) if not o.startswith('--out_dir')]
        status, started = raw(url, 'POST', '/api/train/start', {'config': 'train_shakespeare_char_cpu.py',
                                                                'overrides': overrides})
        assert status == 200, started
        deadline = time.time() + 120
        while raw(url, 'GET', '/api/train/status')[1]['running'] and time.time() < deadline:
            time.sleep(0.3)
        log = raw(url, 'GET', '/api/train/log?offset=0')[1]
    expected = tmp_path / 'runs' / 'out-shakespeare-char'
    assert log['returncode'] == 0 and f'--out_dir={expected}' in log['text'], log['text'][-2000:]
    assert torch.load(expected / 'ckpt.pt', weights_only=True)['iter_num'] == 3


# -----------------------------------------------------------------------------
# export never deletes what is not its own previous export

def test_export_never_replaces_its_source_or_unrelated_files(tmp_path):
    folder = tmp_path / 'S'
    run = write_checkpoint(folder / 'run')
    (folder / 'notes.txt').write_text('keep me')
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'thesis.txt').write_text('keep me too')
    procs = [subprocess.Popen([sys.executable, 'export.py', f'--out_dir={run}', f'--to={target}', '--overwrite=True',
                               '--check=False'], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for target in (folder, run, other)]
    for proc, reason in zip(procs, ['holds the model being exported'] * 2 + ['is not a previous transformers export']):
        proc.stderr = proc.communicate(timeout=300)[1]
        assert reason in one_line_error(proc)
    assert (folder / 'notes.txt').exists() and os.path.exists(os.path.join(run, 'ckpt.pt'))
    assert (other / 'thesis.txt').read_text() == 'keep me too'
    # (test_export.py's test_export_errors_are_one_line_and_write_nothing replaces a previous export)


@pytest.mark.skipif(not (SHARED / 'tiktoken_cache').is_dir(), reason="../shared/tiktoken_cache missing")
def test_bench_serve_says_in_one_line_when_the_gguf_export_fails():
    # a random model whose vocabulary GPT-2's tokenizer does not fit: export.py refuses it, and the
    # benchmark says so in a line rather than a CalledProcessError traceback (it never starts a server)
    proc = subprocess.run([sys.executable, 'bench_serve.py', '--compare_llamacpp=True', '--llama_server=/bin/true',
                           '--n_layer=1', '--n_head=2', '--n_embd=16', '--block_size=16', '--vocab_size=100',
                           '--dtype=float32'], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith('export.py could not write the GGUF file: error: the tokenizer'), lines[-1]


# -----------------------------------------------------------------------------
# train.py: diverging runs, settings that cannot work, runs that end between evaluations

def test_a_diverging_run_stops_and_never_saves_non_finite_weights(workdir):
    train(workdir, '--out_dir=out-good', '--max_iters=4', '--eval_interval=2')
    good = torch.load(workdir / 'out-good' / 'ckpt.pt', weights_only=True)
    proc = train(workdir, '--out_dir=out-good', '--init_from=resume', '--max_iters=40', '--eval_interval=2',
                 '--learning_rate=1e6', '--always_save_checkpoint=True', check=False)
    line = one_line_error(proc)
    assert 'diverged' in line and re.search(r'at iteration \d+', line) and 'holds iteration 4' in line, line
    after = torch.load(workdir / 'out-good' / 'ckpt.pt', weights_only=True)
    assert after['iter_num'] == 4 and all(torch.equal(good['model'][k], after['model'][k]) for k in good['model'])


def test_a_run_that_ends_between_evaluations_saves_its_last_iteration(workdir):
    """The README's own-text recipe: max_iters below the config's eval_interval still leaves a model."""
    proc = train(workdir, '--out_dir=out-short', '--max_iters=7', '--eval_interval=250')
    assert re.search(r'^step 7: train loss', proc.stdout, re.M) and 'done: out-short/ckpt.pt holds iteration 7' in proc.stdout
    assert torch.load(workdir / 'out-short' / 'ckpt.pt', weights_only=True)['iter_num'] == 7
    assert len(re.findall(r'^iter \d+:', proc.stdout, re.M)) == 7  # iterations 0..6, then the final evaluation


def test_settings_that_cannot_work_are_one_line(workdir, capsys):
    from common import check_training_settings
    from configurator import check_value, settings_in
    settings = ['--batch_size=-1', '--batch_size=0', '--block_size=0', '--eval_iters=0', '--gradient_accumulation_steps=0',
                '--eval_interval=0', '--log_interval=0', '--learning_rate=1e999', '--beta2=1.0']
    # each through the check train.py (and every training script) makes first, in this process
    defaults = settings_in(REPO / 'train.py')
    for setting in settings:
        key, text = setting[2:].split('=')
        with pytest.raises(SystemExit) as exit:
            check_training_settings(dict(defaults, **{key: check_value(defaults, key, text)}))
        err = capsys.readouterr().err
        assert exit.value.code == 1 and len(err.strip().splitlines()) == 1 and err.startswith(f'error: {key}'), err
    # and train.py makes it before any work: two of them end to end, nothing written
    procs = [subprocess.Popen([sys.executable, str(REPO / 'train.py'), *TINY_TRAIN, '--out_dir=out-bad', setting],
                              cwd=workdir, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS='1'),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for setting in (settings[0], settings[-2])]
    for setting, proc in zip((settings[0], settings[-2]), procs):
        proc.stderr = proc.communicate(timeout=300)[1]
        assert setting.split('=')[0][2:] in one_line_error(proc)
    assert not (workdir / 'out-bad').exists()


def test_token_ids_past_the_vocabulary_and_code_in_meta_pkl_are_one_line(workdir, tmp_path):
    bad = workdir / 'data' / 'badids'
    bad.mkdir()
    for name in ('val.bin', 'meta.pkl'):
        (bad / name).write_bytes((workdir / 'data' / 'tiny' / name).read_bytes())
    ids = np.fromfile(workdir / 'data' / 'tiny' / 'train.bin', dtype=np.uint16)
    ids[::50] = 60000
    ids.tofile(bad / 'train.bin')
    assert 'token id 60000' in one_line_error(train(workdir, '--out_dir=out-ids', '--dataset=badids', '--max_iters=2',
                                                    check=False))

    class Evil:
        def __reduce__(self):
            return (os.system, ('echo pwned',))
    (bad / 'meta.pkl').write_bytes(pickle.dumps({'vocab_size': 3, 'x': Evil()}))
    line = one_line_error(train(workdir, '--out_dir=out-ids', '--dataset=badids', check=False))
    assert 'only plain data' in line


def test_sample_cli_refuses_a_binary_prompt_file_and_a_negative_seed(tmp_path):
    out_dir = write_checkpoint(tmp_path / 'out')
    (tmp_path / 'prompt.bin').write_bytes(bytes(range(256)))
    for arg in [f'--start=FILE:{tmp_path / "prompt.bin"}', '--seed=-1', '--max_new_tokens=0']:
        one_line_error(run_script('sample.py', f'--out_dir={out_dir}', '--device=cpu', '--dtype=float32', arg,
                                  check=False))


# -----------------------------------------------------------------------------
# the server under seeded random traffic: good and bad requests, streams dropped midway, model swaps

def test_random_traffic_never_hangs_or_breaks_the_server(tmp_path, monkeypatch, one_thread):
    import http.client
    import random

    first, second = write_checkpoint(tmp_path / 'out-a'), write_checkpoint(tmp_path / 'out-b', seed=1, use_rope=True)
    httpd, url = in_process_server(loaded_model(first), root=str(tmp_path))  # where model loads may come from
    port = httpd.server_address[1]
    failures, statuses = [], []

    good = dict(max_tokens=[1, 5, 20], temperature=[0, 0.7, 2.0], top_k=[0, 3], top_p=[1.0, 0.5], n=[1, 2, 4],
                seed=[3, 4], frequency_penalty=[0, 1.5], repetition_penalty=[1.0, 1.3], stop=['e', ['o', 'x']],
                logit_bias=[{'3': 5}])
    bad = dict(max_tokens=[0, -1, 'x'], temperature=[-1, 1e300], top_k=[10 ** 30], top_p=[0.0], n=[9], seed=['3'],
               frequency_penalty=[3], stop=[{}], logit_bias=[{'999': 1}])

    def settings(rng):
        body = {k: rng.choice(v) for k, v in good.items() if rng.random() < 0.4}
        if rng.random() < 0.25:  # one field a client got wrong
            key = rng.choice(list(bad))
            body[key] = rng.choice(bad[key])
        return body

    def worker(index):
        rng = random.Random(index)
        for _ in range(20):
            op = rng.choice(['complete', 'complete', 'chat', 'stream', 'drop', 'echo', 'load', 'junk'])
            try:
                conn = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
                if op == 'load':
                    conn.request('POST', '/api/model/load', json.dumps({'out_dir': rng.choice([first, second])}))
                elif op == 'junk':
                    conn.request('POST', '/v1/completions', rng.choice([b'{', b'[]', b'{"prompt": NaN}', b'\xff']))
                elif op == 'chat':
                    conn.request('POST', '/v1/chat/completions', json.dumps(dict(
                        settings(rng), messages=[{'role': 'user', 'content': rng.choice(['the fox', 'dog?', ''])}])))
                else:
                    body = dict(settings(rng), prompt=rng.choice(['the', 'a quick fox', [1, 2, 3], ['the', 'dog']]))
                    if op in ('stream', 'drop'):
                        body['stream'] = True
                    if op == 'echo':
                        body.update(echo=True, logprobs=2, max_tokens=rng.choice([0, 3]))
                    conn.request('POST', '/v1/completions', json.dumps(body))
                response = conn.getresponse()
                if op == 'drop' and response.status == 200:
                    response.read(50)  # a client that leaves mid-stream
                    conn.close()
                    continue
                data = response.read()
                statuses.append((op, response.status))
                assert response.status in (200, 400, 503), (op, response.status, data)
                if response.status == 200 and op != 'stream':
                    reply = json.loads(data, parse_constant=lambda name: failures.append(f'{name} in {op}'))
                    if op in ('complete', 'chat', 'echo'):
                        assert all(c['finish_reason'] in ('stop', 'length') for c in reply['choices']), reply
                if response.status == 200 and op == 'stream':
                    assert data.rstrip().endswith(b'data: [DONE]') or b'"error"' in data, data[-300:]
                conn.close()
            except Exception as e:  # noqa: BLE001 - every failure is collected and reported below
                failures.append(f"{op}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not failures, failures[:5]
        ok = [op for op, status in statuses if status == 200]
        assert {'complete', 'chat', 'stream', 'echo', 'load'} <= set(ok) and len(ok) > 20, statuses
        assert len([s for _, s in statuses if s == 400]) > 5, statuses
        deadline = time.time() + 10  # dropped streams are noticed within a step or two
        while (health(url)['active_rows'] or health(url)['waiting']) and time.time() < deadline:
            time.sleep(0.1)
        status = health(url)
        assert status['active_rows'] == 0 and status['waiting'] == 0 and status['restarts'] == 0, status
        assert raw(url, 'POST', '/v1/completions', dict(prompt='the', max_tokens=3))[0] == 200
    finally:
        httpd.shutdown()
        httpd.worker.close()
