"""
chat_eval.py's benchmarks: each task's prompts and loader on files in the hub's schemas (written here, never
downloaded); base-model scores equal lm-eval-harness's on the same model exported by export.py and the same
files; categorical scoring against a hand-computed case, in process and through serve.py; GSM8K's answer
extraction; the HumanEval sandbox against programs that loop, allocate 10 GB, connect, write outside or exit
early; engine.continuation_logprobs against plain forwards; bits per byte.
"""
import contextlib
import json
import math
import os
import pickle
import random
import time

import pytest
import torch

from conftest import REPO, run_script
import chat_eval
from engine import continuation_logprobs
from model import GPT, GPTConfig
from tasks import arc, gsm8k, hellaswag, humaneval, mmlu
from tasks.common import load_rows
from tasks.execution import run_python
from tokenizer import render_chat, tokenizer_from_meta, train_bpe
from test_serve import start_server, stop_server

CHARS = sorted(set("\n abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,?:!'"))
WORDS = "the a cat dog sun moon water rock plant grows falls heat cold light dark river tree seed leaf".split()


def save(out_dir, model, meta):
    os.makedirs(out_dir, exist_ok=True)
    args = {k: getattr(model.config, k) for k in GPTConfig.__dataclass_fields__}
    torch.save({'model': model.state_dict(), 'optimizer': {}, 'model_args': args, 'iter_num': 0,
                'best_val_loss': float('nan'), 'config': {}}, os.path.join(out_dir, 'ckpt.pt'))
    with open(os.path.join(out_dir, 'meta.pkl'), 'wb') as f:
        pickle.dump(meta, f)
    return str(out_dir)


def write_jsonl(path, rows):
    with open(path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)
    return str(path)


def arc_rows(n, rng):
    sent = lambda k: ' '.join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    rows = []
    for i in range(n):
        k = rng.choice([3, 4, 5])
        labels = list('ABCDE'[:k]) if i % 5 else [str(j + 1) for j in range(k)]  # ARC has both kinds
        question = sent(rng.randint(3, 9)).capitalize() + '?' + (' 9%' if i % 7 == 0 else '')  # 9% the chars lack
        rows.append({'id': f'q{i}', 'question': question, 'choices': {'text': [sent(rng.randint(1, 4)) for _ in range(k)],
                     'label': labels}, 'answerKey': rng.choice(labels)})
    return rows


def hellaswag_rows(n, rng):
    sent = lambda k: ' '.join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [{'ind': i, 'activity_label': sent(2).capitalize(), 'ctx_a': sent(5).capitalize() + '.', 'ctx_b': sent(2),
             'ctx': '', 'endings': [sent(rng.randint(2, 6)) + (' [title] x' if j == i % 4 else '') for j in range(4)],
             'source_id': 'x', 'split': 'val', 'split_type': 'indomain', 'label': str(rng.randrange(4))} for i in range(n)]


@contextlib.contextmanager
def settings(**values):
    """chat_eval's settings for one in-process run (as its command line would set them), restored after."""
    names = set(values) | {'mode', 'model', 'tokenizer', 'info', 'block_size'}
    old = {k: getattr(chat_eval, k) for k in names}
    for k, v in values.items():
        setattr(chat_eval, k, v)
    try:
        chat_eval.load()
        yield chat_eval
    finally:
        for k, v in old.items():
            setattr(chat_eval, k, v)


# ---------------------------------------------------------------------------------------------
# prompts and loaders

def test_prompts_are_lm_eval_harness_ones():
    row = {'id': 'x', 'question': 'Which is a gas?', 'choices': {'text': ['ice', 'steam', 'rock'], 'label': ['1', '2', '3']},
           'answerKey': '2'}
    ex = arc.example(row)
    assert ex['query'] == 'Question: Which is a gas?\nAnswer:' and ex['choices'] == ['ice', 'steam', 'rock'] and ex['gold'] == 1
    ex = mmlu.example({'question': ' 2+2? ', 'subject': 'high_school_mathematics', 'choices': ['1', '4', '3', '2'], 'answer': 1})
    assert ex['description'] == 'The following are multiple choice questions (with answers) about high school mathematics.\n\n'
    assert ex['query'] == '2+2?\nA. 1\nB. 4\nC. 3\nD. 2\nAnswer:' and ex['choices'] == list('ABCD') and ex['gold'] == 1
    ex = hellaswag.example({'activity_label': 'Cooking', 'ctx_a': 'A man cuts bread.', 'ctx_b': 'he',
                            'endings': ['eats it [title] Then', ' [step] toasts it.'], 'label': '1'})
    assert ex['query'] == 'Cooking: A man cuts bread. He' and ex['choices'] == ['eats it. Then', ' toasts it.'] and ex['gold'] == 1
    ex = gsm8k.example({'question': 'How many?', 'answer': 'Two and <<1+1=2>>2.\n#### 2'})
    assert ex['query'] == 'Question: How many?\nAnswer:' and ex['answer'] == '2'


def test_load_rows_reads_local_files_in_the_hub_schema(tmp_path):
    rows = arc_rows(3, random.Random(0))
    assert load_rows(arc.HUB, 'ARC-Easy', 'test', write_jsonl(tmp_path / 'a.jsonl', rows)) == rows
    for bad in (str(tmp_path / 'a.txt'), str(tmp_path / 'missing.jsonl')):
        with pytest.raises(ValueError) as e:
            load_rows(arc.HUB, 'ARC-Easy', 'test', bad)
        assert '\n' not in str(e.value)


def test_gsm8k_answer_extraction():
    ex = gsm8k.example({'question': 'q', 'answer': 'so 1,200 <<600*2=1200>>\n#### 1,200'})
    assert ex['answer'] == '1200'
    assert gsm8k.correct(ex, 'Half is 600, twice that is 1200.\n#### 1200.')
    assert gsm8k.correct(ex, '#### 1,200 and later #### 7')  # the first marked number counts
    assert not gsm8k.correct(ex, 'The answer is 1200')  # no '####': unmarked numbers do not count
    assert not gsm8k.correct(ex, '#### 120')
    assert gsm8k.final_number('#### -3') == '-3' and gsm8k.final_number('####') is None


# ---------------------------------------------------------------------------------------------
# HumanEval: the sandbox

PROBLEM = {'task_id': 'HumanEval/0', 'prompt': 'import math\n\n\ndef hyp(a, b):\n    """The hypotenuse."""\n',
           'canonical_solution': '    return math.sqrt(a * a + b * b)\n', 'entry_point': 'hyp',
           'test': 'def check(candidate):\n    assert candidate(3, 4) == 5\n'}


def test_humaneval_runs_right_programs_and_fails_wrong_ones():
    ex = humaneval.example(PROBLEM)
    assert humaneval.correct(ex, PROBLEM['canonical_solution'], False, 10)  # a base model continues the prompt
    chat_reply = "Here it is:\n```python\ndef hyp(a, b):\n    return math.hypot(a, b)\n```\nDone."
    assert humaneval.correct(ex, chat_reply, True, 10)  # a chat model's code block, after the prompt's imports
    assert not humaneval.correct(ex, '    return a + b\n', False, 10)


def test_sandbox_contains_what_a_bad_completion_does(tmp_path):
    outside = tmp_path / 'outside.txt'
    keep = tmp_path / 'keep.txt'
    keep.write_text('keep')
    bad = {'loops forever': 'while True:\n    pass\n',
           'allocates 10 GB': 'x = bytearray(10 * 1024 ** 3)\n',
           'opens a socket': "import socket\nsocket.create_connection(('127.0.0.1', 9))\n",
           'writes outside': f"open({str(outside)!r}, 'w').write('x')\n",
           'deletes outside': f"import os\nos.remove({str(keep)!r})\n",
           'starts a process': f"import subprocess\nsubprocess.run(['touch', {str(outside)!r}])\n",
           'runs a shell': f"import os\nos.system('touch {outside}')\n",
           'exits early with 0': 'import os\nos._exit(0)\n'}
    for what, program in bad.items():
        t0 = time.time()
        passed, why = run_python(program + 'assert False\n' * (what == 'exits early with 0'), timeout=1.5)
        assert not passed and why, what
        assert time.time() - t0 < 10, what
    assert not outside.exists() and keep.read_text() == 'keep'
    assert run_python("open('mine.txt', 'w').write('x')\nassert open('mine.txt').read() == 'x'\n")[0]  # its own directory


# ---------------------------------------------------------------------------------------------
# the engine's log-likelihoods

def test_continuation_logprobs_equal_plain_forwards(one_thread):
    """Seeded random requests (shared contexts, one-token and long continuations, sequences longer than the
    context, odd batch sizes): each equals the log-softmax of a forward over that sequence alone."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=70, bias=False, dropout=0.0)).eval()
    rng = random.Random(0)
    requests = []
    for _ in range(40):
        context = [rng.randrange(64) for _ in range(rng.randint(1, 30))]
        for _ in range(rng.randint(1, 3)):  # several continuations of one context, as the options of a question
            requests.append((context, [rng.randrange(64) for _ in range(rng.choice([1, 1, 3, 30]))]))
    got = continuation_logprobs(model, requests, vocab_size=64, batch_size=rng.choice([1, 5, 16]))
    for (context, continuation), lps in zip(requests, got):
        whole = (context + continuation)[-25:]
        n = min(len(continuation), len(whole) - 1)
        with torch.no_grad():
            logits, _ = model(torch.tensor([whole[:-1]]), torch.zeros(1, len(whole) - 1, dtype=torch.long))
        logits[..., 64:] = float('-inf')
        want = logits[0].log_softmax(-1)[-n:].gather(1, torch.tensor(whole[-n:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(lps), want, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# base models: the same numbers as lm-eval-harness

@pytest.fixture(scope='module')
def char_model(tmp_path_factory):
    """A random character-level model with large weights (so options differ clearly in likelihood), exported."""
    root = tmp_path_factory.mktemp('eval')
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=256, vocab_size=len(CHARS), bias=False, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(20)
    out = save(root / 'chars', model, {'vocab_size': len(CHARS), 'stoi': {c: i for i, c in enumerate(CHARS)},
                                       'itos': dict(enumerate(CHARS))})
    run_script(REPO / 'export.py', f'--out_dir={out}', f'--to={root / "chars-hf"}', env={'OMP_NUM_THREADS': '1'})
    rng = random.Random(0)
    files = dict(arc=write_jsonl(root / 'arc.jsonl', arc_rows(100, rng)),
                 hellaswag=write_jsonl(root / 'hellaswag.jsonl', hellaswag_rows(60, rng)))
    return dict(root=root, out=out, hf=str(root / 'chars-hf'), files=files)


def test_base_scores_equal_lm_eval_harness(char_model, one_thread):
    """ARC zero-shot and HellaSwag two-shot (few-shot examples from its 'train' file) scored here and by
    lm-eval-harness's own arc_easy and hellaswag configs (--model hf) on local copies: equal, question for question."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    import lm_eval
    tasks_dir = os.path.join(os.path.dirname(lm_eval.__file__), 'tasks')
    configs = char_model['root'] / 'lm_eval_tasks'
    configs.mkdir(exist_ok=True)
    for name, parent, splits in (('local_arc', 'arc/arc_easy.yaml', "    test: {f}\n"),
                                 ('local_hellaswag', 'hellaswag/hellaswag.yaml', "    validation: {f}\n    train: {f}\nnum_fewshot: 2\n")):
        f = char_model['files']['arc' if 'arc' in name else 'hellaswag']
        (configs / f'{name}.yaml').write_text(f"include: {os.path.join(tasks_dir, parent)}\ntask: {name}\ndataset_path: json\n"
                                              f"dataset_name: null\ndataset_kwargs:\n  data_files:\n" + splits.format(f=f) +
                                              ("training_split: null\nvalidation_split: null\n" if 'arc' in name else ''))
    manager = TaskManager(include_path=str(configs), include_defaults=False)
    out = simple_evaluate(model='hf', model_args=f"pretrained={char_model['hf']},dtype=float32",
                          tasks=['local_arc', 'local_hellaswag'], task_manager=manager, device='cpu', batch_size=32,
                          log_samples=True)
    theirs = {name: [(s['acc'], s['acc_norm']) for s in sorted(samples, key=lambda s: s['doc_id'])]
              for name, samples in out['samples'].items()}
    for name, ours_name, shots in (('local_arc', 'arc_easy', 0), ('local_hellaswag', 'hellaswag', 2)):
        files = char_model['files']['arc' if 'arc' in name else 'hellaswag']
        with settings(out_dir=char_model['out'], task=ours_name, mode='base', dtype='float32', data_files=files,
                      fewshot_files=files if shots else '', num_fewshot=shots) as ce:
            metrics, _, n = ce.run_choice(ours_name, *ce.examples_and_shots(ours_name))
        acc, acc_norm = zip(*theirs[name])
        assert n == len(acc) and (metrics['acc'], metrics['acc_norm']) == (sum(acc) / n, sum(acc_norm) / n), name
        assert 0 < metrics['acc'] < 1 and metrics['acc'] != metrics['acc_norm']  # a test that can fail


# ---------------------------------------------------------------------------------------------
# chat models: categorical scoring, by hand

@pytest.fixture(scope='module')
def chat_model(tmp_path_factory):
    """A chat model whose every position gives the same logits, set by hand: its final norm outputs its bias
    alone. <|assistant_end|> first (replies end at once), then D > B > C > A among the letters; 'E' above all
    letters, to show that only a question's own letters count."""
    root = tmp_path_factory.mktemp('chat')
    meta = train_bpe(["Multiple choice question: which one? A B C D E answer with the letter " * 20], 300)
    tok = tokenizer_from_meta(meta)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=meta['vocab_size'], bias=True,
                          dropout=0.0, tie_embeddings=False))
    logits = {tok.special_tokens['<|assistant_end|>']: 9.0, tok.encode('E')[0]: 5.0, tok.encode('D')[0]: 4.0,
              tok.encode('B')[0]: 3.0, tok.encode('C')[0]: 2.0, tok.encode('A')[0]: 1.0}
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(torch.eye(32)[0])  # the final hidden state: e0, whatever the input
        model.lm_head.weight.zero_()
        for i, value in logits.items():
            model.lm_head.weight[i, 0] = value
    return dict(root=root, out=save(root / 'chat', model, meta), tok=tok, logits=logits)


def test_categorical_scoring_by_hand(chat_model, tmp_path, one_thread):
    """Questions of 3, 4 and 5 options: the model must pick B of A-C, D of A-D and E of A-E, in process and
    through serve.py; with the answers C, D, E, acc is 2/3. Scored as a base model (in process and through
    serve.py's echoed log-probabilities), every token but the six above has one log-probability, so an option of
    m x's scores m + 1 times it (its space too): the shortest option wins acc (the answers are the shortest: 1),
    the longest acc_norm (never an answer: 0)."""
    BY_HAND = {'acc': 1.0, 'acc_norm': 0.0}  # the base-model scores
    rows = [{'id': str(k), 'question': 'which one?', 'choices': {'text': ['x' * (k - i) for i in range(k)],
             'label': list('ABCDE'[:k])}, 'answerKey': 'CDE'[k - 3]} for k in (3, 4, 5)]
    files = write_jsonl(tmp_path / 'arc.jsonl', rows)
    with settings(out_dir=chat_model['out'], task='arc_easy', data_files=files, dtype='float32') as ce:
        assert ce.mode == 'chat'  # a tokenizer with chat tokens
        conversations = [[('user', 'which one?')]] * 3
        picks = ce.letter_picks(conversations, [list('ABC'), list('ABCD'), list('ABCDE')])
        assert picks == [1, 3, 4]  # B of A-C (B 3 > C 2 > A 1), D of A-D, E of A-E
        metrics, chance, n = ce.run_choice('arc_easy', *ce.examples_and_shots('arc_easy'))
        assert (metrics['acc'], n) == (2 / 3, 3) and abs(chance - (1 / 3 + 1 / 4 + 1 / 5) / 3) < 1e-12
        proc, url = start_server(str(tmp_path), chat_model['out'])
        try:
            with settings(url=url, out_dir=chat_model['out'], task='arc_easy', data_files=files) as remote:
                assert remote.letter_picks(conversations, [list('ABC'), list('ABCD'), list('ABCDE')]) == [1, 3, 4]
                assert remote.run_choice('arc_easy', *remote.examples_and_shots('arc_easy'))[0] == metrics
            with settings(url=url, out_dir=chat_model['out'], task='arc_easy', data_files=files, mode='base') as remote:
                assert remote.run_choice('arc_easy', *remote.examples_and_shots('arc_easy'))[0] == BY_HAND
        finally:
            stop_server(proc)
    with settings(out_dir=chat_model['out'], task='arc_easy', data_files=files, mode='base', dtype='float32') as ce:
        assert ce.run_choice('arc_easy', *ce.examples_and_shots('arc_easy'))[0] == BY_HAND


def test_cli_table_json_and_errors(chat_model, tmp_path, capsys):
    """One command line: a table and {task: {metric: value}}; bad settings stop with one line, before the model
    is loaded."""
    gsm = write_jsonl(tmp_path / 'gsm.jsonl', [{'question': 'What is 1 + 1?', 'answer': '1 + 1 = 2\n#### 2'}] * 2)
    proc = run_script(REPO / 'chat_eval.py', f"--out_dir={chat_model['out']}", '--task=gsm8k', f'--data_files={gsm}',
                      f'--json_out={tmp_path / "r.json"}', '--device=cpu', '--max_new_tokens=8', env={'OMP_NUM_THREADS': '1'})
    result = json.loads((tmp_path / 'r.json').read_text())
    assert result['gsm8k'] == {'acc': 0.0, 'n': 2, 'centered': 0.0} and result['centered_mean']['tasks'] == 1
    assert 'gsm8k' in proc.stdout and 'centered mean over 1 task: 0.0000' in proc.stdout
    for values, says in ((dict(task='arc'), 'task must be'), (dict(task='gsm8k', data_files='nope.jsonl'), 'cannot load'),
                         (dict(task='arc_easy', data_files=gsm), 'not in the arc_easy schema'),
                         (dict(task='gsm8k,mmlu', data_files=gsm), 'one task'),
                         (dict(task='gsm8k', data_files=gsm, num_fewshot=2), 'fewshot_files'),
                         (dict(task='gsm8k', mode='instruct'), 'mode must be')):
        old = {k: getattr(chat_eval, k) for k in (*values, 'out_dir', 'load')}
        vars(chat_eval).update(values, out_dir='no-such-model', load=None)  # the model is never reached
        try:
            with pytest.raises(SystemExit) as e:
                chat_eval.main()
        finally:
            vars(chat_eval).update(old)
        lines = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and len(lines) == 1 and lines[0].startswith('error: ') and says in lines[0], (values, lines)


def test_bits_per_byte(char_model, tmp_path, one_thread):
    text = ''.join(random.Random(0).choice(CHARS) for _ in range(3000))
    (tmp_path / 'text.txt').write_text(text)
    with settings(out_dir=char_model['out'], task='bpb', data_files=str(tmp_path / 'text.txt'), dtype='float32') as ce:
        metrics, _, n = ce.run_bpb()
        ids = torch.tensor(ce.tokenizer.encode(text))
        model = ce.model
    windows = (len(ids) - 1) // 256
    x = torch.stack([ids[i * 256:(i + 1) * 256] for i in range(windows)])
    y = torch.stack([ids[i * 256 + 1:(i + 1) * 256 + 1] for i in range(windows)])
    with torch.no_grad():
        _, loss = model(x, y)
    assert n == len(ids) and abs(metrics['loss'] - loss.item()) < 1e-5
    assert abs(metrics['bpb'] - loss.item() / math.log(2)) < 1e-5  # ASCII: one byte a token
