"""
Chat models that call a calculator and learn from rewards: the calculator computes arithmetic and
refuses everything else; the engine feeds forced tokens to one row while the others sample, as if
the forced ones were not there; rendering masks the calculator's output; the hub converters read
their datasets' own schemas; sample.py --chat, chat_eval.py and serve.py answer a call the same
way; one RL step moves the model toward the rewarded reply; an RL run resumes exactly.
"""
import io
import json
import os
import pickle
import random
import runpy
import sys
import time

import pytest
import torch

import textgen
from calculator import MAX_DIGITS, TIME_LIMIT, calculate, number_text, tool_calls
from conftest import REPO, run_script
from engine import Engine, Row
from checkpoint import write_checkpoint
from model import GPT, GPTConfig
from textgen import decode_step, start_reply, stop_tokens_of
from tokenizer import (SPECIAL_TOKENS, chat_tokens, content_text, parse_conversation, render_chat, reply_content,
                       tokenizer_from_meta, train_bpe)

pytestmark = pytest.mark.usefixtures('one_thread')

CALL = [{'type': 'python', 'text': '12*3'}, {'type': 'python_output', 'text': '36'}, {'type': 'text', 'text': 'Answer: 36'}]
CONVERSATION = [('user', 'What is 12 * 3?'), ('assistant', CALL)]
REPLY = '<|python_start|>12*3<|python_end|><|output_start|>36<|output_end|>Answer: 36'


@pytest.fixture(scope='module')
def bpe_meta():
    return train_bpe(["What is 12 * 3? Answer: 36. Multiply 4821 by 397: 1913937. error: only numbers are allowed\n" * 20],
                     300)


@pytest.fixture(scope='module')
def bpe(bpe_meta):
    return tokenizer_from_meta(bpe_meta)


# --- the calculator ---------------------------------------------------------------

def test_calculator_computes_arithmetic_and_refuses_the_rest():
    for expression, value in {'12*34': '408', '48/2': '24', '12/60': '0.2', '7//2': '3', '-7%3': '2', '-(3+4)*2': '-14',
                              ' 1.5 * 2 ': '3', '(((1)))+2': '3', '4821*397': '1913937'}.items():
        assert calculate(expression) == value
    hostile = ['__import__("os").system("echo hi")', 'open("/etc/passwd").read()', '(1).__class__',
               '().__class__.__bases__[0].__subclasses__()', 'x', 'abs(-1)', 'a.b', '2**10', '9**9**9**9', '10**100000',
               '(10**10)**(10**10)', "'a'*10**9", '"ab"', "b'x'", 'f"{1}"', 'lambda: 1', '(lambda: 1)()', '[1, 2]', '{}',
               '1 if 1 else 2', '1 < 2', 'not 1', '1 and 2', '~1', '1 @ 2', 'True + 1', '1j * 2', '1,000', '1;2',
               'import os', '', ' ', '9' * 30 + '*' + '9' * 30, '1e308 * 10', '1/0', '5 % 0', '5 // 0',
               '1' * 300, '(' * 150 + '1' + ')' * 150, '10' + '*10' * 60, str(10 ** 60) + '/3']
    for expression in hostile:
        t0 = time.perf_counter()
        result = calculate(expression)
        assert result.startswith('error: '), (expression, result)
        # its own deadline stops it at TIME_LIMIT; the margin is for a busy machine's scheduling, not for the work
        assert time.perf_counter() - t0 < TIME_LIMIT + 0.5, expression


def test_calculator_against_random_expressions():
    """Seeded random expression trees: the calculator agrees with Python's own arithmetic, computed
    here while the tree is built; random strings of operators, names and quotes never raise."""
    rng = random.Random(0)

    def tree(depth):  # (text, value) of a random expression
        if depth == 0 or rng.random() < 0.3:
            value = rng.choice([rng.randint(0, 10 ** rng.randint(1, 12)), round(rng.uniform(0, 1000), 2)])
            return str(value), value
        (a, x), (b, y) = tree(depth - 1), tree(depth - 1)
        op = rng.choice(['+', '-', '*', '/', '//', '%'])
        value = {'+': lambda: x + y, '-': lambda: x - y, '*': lambda: x * y, '/': lambda: x / y,
                 '//': lambda: x // y, '%': lambda: x % y}[op]()
        return f"({a}{op}{b})", value

    checked = 0
    for _ in range(300):
        try:
            text, value = tree(4)
        except (ZeroDivisionError, OverflowError):
            continue
        result = calculate(text)
        if len(text) > 200 or not abs(value) < 10 ** MAX_DIGITS:
            assert result.startswith('error: ')
        else:  # a big intermediate result may still be refused on the way
            assert result == number_text(value) or result == 'error: the result is too large', (text, value, result)
            checked += result == number_text(value)
    assert checked > 100
    alphabet = "0123456789+-*/%().  _eaxj'\"[]{}:,lambd\\\n"
    for _ in range(2000):
        text = ''.join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        result = calculate(text)
        assert isinstance(result, str) and (result.startswith('error: ') or float(result) == float(result))


# --- forced tokens in the engine ----------------------------------------------------

def tiny_model(vocab_size=40, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=vocab_size, dropout=0.0)).eval()


def decode(model, rows, max_rows=None):
    engine = Engine(model, max_rows or len(rows), 32)
    engine.add(rows)
    while engine.rows:
        engine.step()
    return rows


def test_forced_tokens_in_a_batch_of_sampling_rows():
    model = tiny_model()
    alone = [decode(model, [Row(p, 12, seed=s, logprobs=2)])[0].tokens for p, s in (([1, 2, 3], 1), ([4, 5], 2))]
    # row 1 forces three tokens first, then two more after its fourth step, while rows 0 and 2 sample
    rows = [Row([1, 2, 3], 12, seed=1, logprobs=2), Row([7, 8], 12, temperature=0, logprobs=2), Row([4, 5], 12, seed=2, logprobs=2)]
    rows[1].forced.extend([9, 9, 10])
    engine = Engine(model, 3, 32)
    engine.add(rows)
    for _ in range(4):
        engine.step()
    rows[1].forced.extend([11, 12])
    while engine.rows:
        engine.step()
    assert [rows[0].tokens, rows[2].tokens] == alone  # the others are not affected
    assert rows[1].tokens[:3] == [9, 9, 10] and rows[1].tokens[4:6] == [11, 12]
    assert rows[1].sampled == [False] * 3 + [True] + [False] * 2 + [True] * 6
    assert len(rows[1].token_logprobs) == sum(rows[1].sampled) == 7  # no logprobs for forced tokens
    # forcing tokens is having them in the context: the row then samples what a row with them would
    ref = decode(model, [Row([7, 8, 9, 9, 10], 1, temperature=0)])[0].tokens
    assert rows[1].tokens[3] == ref[0]


def test_random_forcing_keeps_rows_consistent():
    """Seeded random operation sequences: rows join, force, get finished, at random; invariants hold."""
    model = tiny_model(seed=1)
    rng = random.Random(0)
    engine, rows, queued = Engine(model, 4, 16), [], {}
    for _ in range(60):
        op = rng.random()
        if op < 0.25 and len(engine.rows) < 4:
            row = Row([rng.randrange(40) for _ in range(rng.randint(1, 5))], rng.randint(1, 16),
                      temperature=rng.choice([0, 1.0]), seed=rng.randrange(100), logprobs=rng.choice([None, 1]),
                      repetition_penalty=rng.choice([1.0, 1.3]), stop_tokens=[rng.randrange(40)])
            engine.add([row])
            rows.append(row)
            queued[id(row)] = []  # (position in tokens, id) of each forced token
        elif op < 0.5 and engine.rows:
            row = rng.choice(engine.rows)
            for token in [rng.randrange(40) for _ in range(rng.randint(1, 3))]:
                queued[id(row)].append((len(row.tokens) + len(row.forced), token))
                row.forced.append(token)
        elif op < 0.55 and engine.rows:
            engine.finish(rng.choice(engine.rows), 'cancelled')
        else:
            engine.step()
    while engine.rows:
        engine.step()
    for row in rows:
        assert row.error is None and len(row.sampled) == len(row.tokens) <= row.max_tokens
        forced_at = {i for i, _ in queued[id(row)] if i < len(row.tokens)}
        assert {i for i, s in enumerate(row.sampled) if not s} == forced_at
        assert all(row.tokens[i] == t for i, t in queued[id(row)] if i < len(row.tokens))
        assert len(row.token_logprobs) == (sum(row.sampled) if row.logprobs is not None else 0)


def test_decode_step_answers_calls(bpe):
    """The calculator runs in decode_step, the one code path of sample.py, chat_eval.py, serve.py and rl.py:
    a row's call (forced here in place of a trained model's) gets its output forced after it; tools=False: none."""
    model = tiny_model(bpe.n_vocab)
    prompt, _ = render_chat(bpe, [('user', 'What is 12 * 3?')])
    special = bpe.special_tokens
    call = [special['<|python_start|>'], *bpe.encode('12*3'), special['<|python_end|>']]
    rows = [Row(prompt, 20, temperature=0, stop_tokens=stop_tokens_of(bpe)) for _ in range(2)]
    engine = Engine(model, 2, 32, vocab_size=bpe.n_vocab)
    for row, tools in zip(rows, (True, False)):
        start_reply(row, bpe, tools=tools)
        row.forced.extend(call)
    engine.add(rows)
    texts = ['', '']
    while engine.rows:
        for row, piece in decode_step(engine):
            texts[rows.index(row)] += piece
    output = [special['<|output_start|>'], *bpe.encode('36'), special['<|output_end|>']]
    assert rows[0].tokens[:len(call) + len(output)] == call + output
    assert texts[0].startswith('<|python_start|>12*3<|python_end|><|output_start|>36<|output_end|>')
    assert rows[0].sampled[:len(call) + len(output)] == [False] * (len(call) + len(output))
    assert all(rows[1].sampled[len(call):]) and rows[1].tokens[:len(call)] == call


# --- rendering: calls learned, outputs masked; old tokenizers unchanged ----------------------

def test_tool_outputs_are_masked(bpe):
    ids, mask = chat_tokens(bpe, CONVERSATION)
    special = bpe.special_tokens
    start, end = ids.index(special['<|output_start|>']), ids.index(special['<|output_end|>'])
    assert bpe.decode(ids[start + 1:end]) == '36' and mask[start:end + 1] == [0] * (end - start + 1)
    call = ids.index(special['<|python_start|>'])
    assert ids[call - 1] == special['<|assistant_start|>'] and mask[call:start] == [1] * (start - call)
    assert bpe.decode([t for t, m in zip(ids, mask) if m]) == '<|python_start|>12*3<|python_end|>Answer: 36<|assistant_end|>'
    prompt, _ = render_chat(bpe, CONVERSATION[:1])
    assert ids[:len(prompt)] == prompt and bpe.decode(ids[len(prompt):-1]) == REPLY == content_text(CALL)
    assert reply_content(REPLY) == CALL and reply_content('no call') == 'no call'
    line = json.dumps({'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': CALL}]})
    assert parse_conversation(line)[1] == ('assistant', CALL)
    for bad in ([{'role': 'user', 'content': CALL}, {'role': 'assistant', 'content': 'a'}],
                [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': [{'type': 'code', 'text': '1'}]}]):
        with pytest.raises(ValueError, match='messages'):
            parse_conversation(json.dumps({'messages': bad}))


def test_tokenizers_with_five_special_tokens_keep_their_ids(bpe):
    """A meta.pkl written before the calculator tokens existed: the same ids, and a clear error for a call."""
    meta = train_bpe(["hello world 123 " * 50], 300)
    n = len(meta['mergeable_ranks'])
    old = dict(meta, vocab_size=n + 5, special_tokens={name: n + i for i, name in enumerate(SPECIAL_TOKENS[:5])})
    tok = tokenizer_from_meta(pickle.loads(pickle.dumps(old)))
    assert tok.special_tokens == old['special_tokens'] and tok.n_vocab == n + 5
    assert chat_tokens(tok, [('user', 'hi'), ('assistant', 'hello')])[0][0] == n  # <|bos|>
    with pytest.raises(ValueError, match='no <\\|python_start\\|> token'):
        chat_tokens(tok, CONVERSATION)
    assert tool_calls(tok) is None  # no calculator for it


# --- the hub converters, on files in the hub's schemas --------------------------------------

def write_hub_fixtures(folder):
    """Small files in each dataset's schema as its dataset card gives it (features and types)."""
    from datasets import ClassLabel, Dataset, Features, Sequence, Value
    files = {}
    rows = {
        'smoltalk': ({'messages': [[{'content': 'Be brief.', 'role': 'system'}, {'content': 'Hi!', 'role': 'user'},
                                    {'content': 'Hello.', 'role': 'assistant'}]] * 4, 'source': ['everyday'] * 4},
                     Features({'messages': [{'content': Value('string'), 'role': Value('string')}],
                               'source': Value('string')})),
        'gsm8k': ({'question': ['Weng earns $12 an hour. She worked 50 minutes. How much did she earn?'] * 3,
                   'answer': ['Per minute: 12/60 = $<<12/60=0.2>>0.2.\nSo 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10'] * 3},
                  Features({'question': Value('string'), 'answer': Value('string')})),
        'arc_easy': ({'id': ['Mercury_1'] * 2, 'question': ['Which is a gas at room temperature?'] * 2,
                      'choices': [{'text': ['iron', 'oxygen', 'salt'], 'label': ['A', 'B', 'C']}] * 2, 'answerKey': ['B'] * 2},
                     Features({'id': Value('string'), 'question': Value('string'),
                               'choices': Sequence({'text': Value('string'), 'label': Value('string')}),
                               'answerKey': Value('string')})),
        'mmlu': ({'question': ['2 + 2 = ?'] * 10, 'subject': ['elementary_mathematics'] * 10,
                  'choices': [['3', '4', '5', '22']] * 10, 'answer': [1] * 10},
                 Features({'question': Value('string'), 'subject': Value('string'), 'choices': Sequence(Value('string')),
                           'answer': ClassLabel(names=['A', 'B', 'C', 'D'])})),
    }
    for name, (columns, features) in rows.items():
        files[name] = str(folder / f'{name}.parquet')
        Dataset.from_dict(columns, features=features).to_parquet(files[name])
    return files


def test_hub_converters_on_their_schemas(tmp_path):
    """prepare.py --mix on a file of each: converted, mixed by epochs, each file's last tenth (at least one) its val."""
    files = write_hub_fixtures(tmp_path)
    out = tmp_path / 'out'
    mix = (f"smoltalk:{files['smoltalk']}*2,gsm8k:{files['gsm8k']},arc_easy:{files['arc_easy']}*0.5,"
           f"mmlu:{files['mmlu']}*1.5,products*0.001")
    proc = run_script(REPO / 'data' / 'chat' / 'prepare.py', f'--mix={mix}', f'--out_dir={out}', '--vocab_size=300',
                      '--n_train=2000', '--n_val=5')
    train = [parse_conversation(line) for line in open(out / 'train.jsonl')]
    val = [parse_conversation(line) for line in open(out / 'val.jsonl')]
    kinds = {}
    for conversation in train:
        reply = conversation[-1][1]
        is_product = isinstance(reply, list) and reply[0]['type'] == 'python'
        kinds.setdefault('products' if is_product else conversation[0][1][:10], []).append(conversation)
    # smoltalk 3 x 2, gsm8k 2, arc 1 x 0.5 -> 0 (rounded to even), mmlu 9 x 1.5 = 13, products 2
    assert sorted(map(len, kinds.values())) == [2, 2, 6, 13] and len(val) == 1 + 1 + 1 + 1 + 5
    assert kinds['Be brief.'][0] == [('system', 'Be brief.'), ('user', 'Hi!'), ('assistant', 'Hello.')]
    (_, question), (_, parts) = kinds['Weng earns'][0]
    assert parts[:3] == [{'type': 'text', 'text': 'Per minute: 12/60 = $'}, {'type': 'python', 'text': '12/60'},
                         {'type': 'python_output', 'text': '0.2'}]
    assert parts[-1]['text'].endswith('#### 10') and content_text(parts).count('<|python_start|>') == 2
    assert [p['text'] for p in parts if p['type'] == 'python_output'] == [calculate(p['text']) for p in parts
                                                                          if p['type'] == 'python']
    (_, mmlu_q), (_, mmlu_a) = kinds['2 + 2 = ?\n'][0]
    assert mmlu_a == 'B' and '\nB: 4\n' in mmlu_q  # the ClassLabel 1 is the letter B
    (_, arc_q), (_, arc_a) = next(c for c in val if c[0][1].startswith('Which is'))
    assert arc_a == 'B' and '\nA: iron\nB: oxygen\nC: salt\n' in arc_q
    assert 'products: 2 train' in proc.stdout
    # a file in another schema: the row named, one line, nothing written
    from data.chat import sources
    from datasets import Dataset
    Dataset.from_dict({'question': ['q']}).to_parquet(str(tmp_path / 'bad.parquet'))
    with pytest.raises(ValueError, match="row 0: not in gsm8k's schema"):
        sources.conversations('gsm8k', str(tmp_path / 'bad.parquet'))
    proc = run_script(REPO / 'data' / 'chat' / 'prepare.py', '--mix=gsm8k*x', f'--out_dir={out}2', check=False)
    assert proc.returncode == 1 and 'NAME[:FILE][*EPOCHS]' in proc.stderr and not (tmp_path / 'out2').exists()


# --- one model, through sample.py, chat_eval.py and serve.py, then RL ---------------------------

def write_sft(out_dir, model, bpe_meta):
    """A checkpoint as train.py writes it, its tokenizer beside it."""
    os.makedirs(out_dir)
    model_args = {k: getattr(model.config, k) for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size',
                                                        'dropout')}
    write_checkpoint(out_dir / 'ckpt.pt', {'model': model.state_dict(), 'optimizer': {}, 'model_args': model_args,
                                           'iter_num': 100, 'best_val_loss': 0.0, 'config': {'dataset': 'chat'}})
    with open(out_dir / 'meta.pkl', 'wb') as f:
        pickle.dump(bpe_meta, f)


@pytest.fixture(scope='module')
def caller(tmp_path_factory, bpe, bpe_meta):
    """A tiny chat model that has memorised one reply with a calculator call (out_dir 'sft'), a random one
    ('random'), and data/chat/{train,val}.jsonl holding that conversation."""
    root = tmp_path_factory.mktemp('caller')
    ids, mask = chat_tokens(bpe, CONVERSATION)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, bias=False, vocab_size=bpe.n_vocab, dropout=0.0)
    write_sft(root / 'random', GPT(config), bpe_meta)
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.tensor([ids[:-1]]), torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:])]])
    for _ in range(40):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    torch.set_num_threads(threads)
    write_sft(root / 'sft', model, bpe_meta)
    os.makedirs(root / 'data' / 'chat')
    line = json.dumps({'messages': [{'role': r, 'content': c} for r, c in CONVERSATION]}) + '\n'
    for split in ('train', 'val'):
        (root / 'data' / 'chat' / f'{split}.jsonl').write_text(line * 2)
    return root


def run_main(monkeypatch, capsys, script, *args, stdin='', cwd=REPO):
    """A script as a user runs it (its settings from the command line), in this process: its stdout."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, 'argv', [script, *map(str, args)])
    monkeypatch.setattr(sys, 'stdin', io.StringIO(stdin))
    capsys.readouterr()
    runpy.run_path(str(REPO / script), run_name='__main__')
    return capsys.readouterr().out


def test_calls_answered_alike_in_sample_chat_eval_and_serve(caller, monkeypatch, capsys):
    from test_serve import client, start_server, stop_server
    out_dir, val = caller / 'sft', caller / 'data' / 'chat' / 'val.jsonl'
    proc, url = start_server(str(caller), str(out_dir))  # while it starts: the same model in this process
    try:
        chat = run_main(monkeypatch, capsys, 'sample.py', f'--out_dir={out_dir}', '--chat=True', '--temperature=0',
                        '--device=cpu', '--max_new_tokens=30', stdin='What is 12 * 3?\n')
        assert chat.split('> ')[1].strip() == REPLY
        for tools, score in ((True, '2/2'), (False, '0/2')):
            out = run_main(monkeypatch, capsys, 'chat_eval.py', f'--out_dir={out_dir}', f'--input={val}', '--device=cpu',
                           '--dtype=float32', '--max_new_tokens=30', f'--tools={tools}')
            assert f'accuracy {score}' in out
        r = client(url).chat.completions.create(model='tiny', messages=[{'role': 'user', 'content': 'What is 12 * 3?'}],
                                                temperature=0, max_tokens=30, logprobs=True)
    finally:
        stop_server(proc)
    assert r.choices[0].message.content == REPLY
    # the calculator's output (forced) has no logprobs: the model's own tokens do
    logged = ''.join(entry.token for entry in r.choices[0].logprobs.content)
    assert logged == '<|python_start|>12*3<|python_end|>Answer: 36'


def sequence_logprob(model, ids, targets):
    logits, _ = model(torch.tensor([ids[:-1]]), torch.tensor([targets]))
    logprobs = torch.log_softmax(logits[0].float(), -1)
    return sum(logprobs[i, t].item() for i, t in enumerate(targets) if t != -1)


def test_one_rl_step_moves_toward_the_rewarded_reply(caller, bpe, monkeypatch, capsys):
    """Two replies to one question, one right (reward 1) and one wrong (0): advantages +0.5 and -0.5. After one
    small step the right reply is more likely and the wrong one less; the loss counts only sampled tokens."""
    special = bpe.special_tokens
    call = [special['<|python_start|>'], *bpe.encode('12*3'), special['<|python_end|>']]
    output = [special['<|output_start|>'], *bpe.encode('36'), special['<|output_end|>']]
    forced = range(len(call), len(call) + len(output))
    replies = [(call + output + bpe.encode(f'Answer: {n}') + [special['<|assistant_end|>']], REPLY[:-2] + n)
               for n in ('36', '63')]

    def fake_generate_text(model, tokenizer, prompts, max_new_tokens, keep=None, **settings):
        for i, prompt in enumerate(prompts):  # the right reply, then the wrong one, ...
            row = Row(prompt, max_new_tokens)
            row.tokens, text = replies[i % 2]
            row.sampled = [j not in forced for j in range(len(row.tokens))]
            keep.append(row)
            yield i, text
    monkeypatch.setattr(textgen, "generate_text", fake_generate_text)
    out = run_main(monkeypatch, capsys, 'rl.py', '--init_from=random', '--out_dir=rl-step', '--max_iters=1',
                   '--questions_per_step=1', '--samples_per_question=2', '--learning_rate=1e-3', '--eval_interval=1',
                   '--device=cpu', '--eval_questions=1', '--eval_samples=2', cwd=caller)
    prompt, _ = render_chat(bpe, CONVERSATION[:1])
    sequences = [(prompt + tokens, [-1] * (len(prompt) - 1) + [-1 if j in forced else t for j, t in enumerate(tokens)])
                 for tokens, _ in replies]
    from checkpoint import load_checkpoint
    before, after = load_checkpoint(caller / 'random')[0], load_checkpoint(caller / 'rl-step')[0]
    with torch.no_grad():
        old = [sequence_logprob(before, ids, targets) for ids, targets in sequences]
        new = [sequence_logprob(after, ids, targets) for ids, targets in sequences]
    assert new[0] > old[0] and new[1] < old[1]
    # the loss printed: -(0.5 x logp(right) - 0.5 x logp(wrong)) / the number of sampled tokens (forced ones left out)
    n_sampled = sum(t != -1 for _, targets in sequences for t in targets)
    loss = float(out.split('iter 0: ')[1].split('loss ')[1].split(',')[0])
    assert loss == pytest.approx(-(0.5 * old[0] - 0.5 * old[1]) / n_sampled, rel=1e-4)
    assert 'held-out pass@1 0.5000, pass@2 1.0000' in out  # the fake's two replies, scored by reward()


def test_rl_resumes_exactly(caller, bpe, monkeypatch, capsys):
    common = ['--device=cpu', '--questions_per_step=2', '--samples_per_question=2', '--eval_interval=2',
              '--eval_questions=2', '--eval_samples=2', '--learning_rate=3e-3', '--lr_decay_iters=4', '--max_new_tokens=24']
    rl = lambda *args: run_main(monkeypatch, capsys, 'rl.py', *common, *args, cwd=caller)  # noqa: E731
    whole = rl('--init_from=sft', '--out_dir=rl-whole', '--max_iters=4')
    rl('--init_from=sft', '--out_dir=rl-half', '--max_iters=2')
    resumed = rl('--init_from=resume', '--out_dir=rl-half', '--max_iters=4')
    log = lambda out, i: out.split(f'iter {i}: ')[1].split(', time')[0]  # noqa: E731
    assert [log(resumed, i) for i in (2, 3)] == [log(whole, i) for i in (2, 3)]
    a, b = (torch.load(caller / d / 'ckpt.pt', weights_only=True) for d in ('rl-whole', 'rl-half'))
    assert a['iter_num'] == b['iter_num'] == 4 and all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert all(torch.equal(x, y) for x, y in zip(a['optimizer']['state'][0].values(), b['optimizer']['state'][0].values()))
    # the checkpoint is train.py's: textgen's loader reads it, tokenizer and all
    model, tokenizer, info = textgen.load_model('resume', str(caller / 'rl-half'), 'cpu', 'float32')
    assert info['iter_num'] == 4 and tokenizer.special_tokens == bpe.special_tokens
    # the settings it used, beside ckpt.pt: fed back to rl.py they run the same run
    again = run_main(monkeypatch, capsys, 'rl.py', 'rl-whole/config.yaml', '--out_dir=rl-again', cwd=caller)
    assert [log(again, i) for i in (0, 1, 2, 3)] == [log(whole, i) for i in (0, 1, 2, 3)]


def test_rl_never_saves_what_went_non_finite(caller, monkeypatch, capsys):
    """rl.py checks its settings with train.py's check (an infinite learning rate is refused before any work), and
    a run that goes non-finite stops before its next save: the resumed run's ckpt.pt stays byte for byte."""
    common = ['--device=cpu', '--questions_per_step=2', '--samples_per_question=2', '--eval_interval=2',
              '--eval_questions=2', '--eval_samples=2', '--max_new_tokens=30', '--out_dir=rl-nan']
    run_main(monkeypatch, capsys, 'rl.py', *common, '--init_from=sft', '--max_iters=2', cwd=caller)
    saved = (caller / 'rl-nan' / 'ckpt.pt').read_bytes()
    for lr, says in (('1e999', 'learning_rate must be a finite number >= 0, not inf'), ('1e30', 'diverged')):
        with pytest.raises(SystemExit) as exit:  # some of its 4 replies right, some not: the step is taken
            run_main(monkeypatch, capsys, 'rl.py', *common, '--init_from=resume', '--max_iters=4',
                     '--samples_per_question=4', f'--learning_rate={lr}', cwd=caller)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit.value.code == 1 and says in err[-1] and err[-1].startswith('error: '), err
        assert (caller / 'rl-nan' / 'ckpt.pt').read_bytes() == saved


def test_bad_settings_are_refused_alike_by_every_training_script(capsys):
    """Seeded random values for the settings train.py and rl.py share: the one check accepts or refuses
    each value the same way for both scripts' settings."""
    import random
    from common import check_training_settings
    from configurator import settings_in
    scripts = {name: settings_in(REPO / name) for name in ('train.py', 'rl.py')}
    shared = sorted(set(scripts['train.py']) & set(scripts['rl.py']))
    rng = random.Random(0)
    values = [0, -1, 1, 0.5, 1.0, 1e999, -1e999, float('nan'), 2 ** 40, 1e-9, 3]
    tried = 0
    for _ in range(400):
        key = rng.choice(shared)
        value = rng.choice(values)
        if not isinstance(scripts['train.py'][key], (int, float)) or isinstance(scripts['train.py'][key], bool):
            continue
        if isinstance(scripts['train.py'][key], int) and not isinstance(value, int):
            continue  # the configurator refuses a float for an int setting before this check
        verdicts = []
        for defaults in scripts.values():
            try:
                check_training_settings(dict(defaults, **{key: value}))
                verdicts.append('accepted')
            except SystemExit:
                verdicts.append(capsys.readouterr().err.strip())
        assert verdicts[0] == verdicts[1], (key, value, verdicts)
        tried += 1
    assert tried > 100
