"""
CORE (tasks/core.py, chat_eval.py --task=core) on a bundle written here in DCLM's format: one task of each kind
(multiple choice with 2 shots, schema with 1, language modeling with 0), scored by a random character-level model
and compared, row by row, with a hand computation that renders the prompts with f-strings, splits choices at the
strings' common prefix (suffix), and scores one sequence at a time from the model's full logits; then the same
through the command line (table, json_out) and its one-line errors.
"""
import json
import os
import pickle
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, run_script
from model import GPT, GPTConfig
from tasks import core

CHARS = sorted(set("\n Aabcdefghijklmnopqrstuvwxyz.?:"))
WORDS = "the a cat dog sun moon water rock plant grows falls heat cold light dark river tree seed leaf".split()
TASKS = [('mc', 'multiple_choice', 2, '\nAnswer: ', 25.0), ('schema', 'schema', 1, ' ', 50.0),
         ('lm', 'language_modeling', 0, '', 0.0)]


def sent(rng, k):
    return ' '.join(rng.choice(WORDS) for _ in range(k))


@torch.no_grad()
def greedy(model, text, n):
    ids = [CHARS.index(c) for c in text]
    for _ in range(n):
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ''.join(CHARS[i] for i in ids[-n:])


@pytest.fixture(scope='module')
def bundle(tmp_path_factory):
    """A random char model with large weights (choices differ clearly), saved as train.py would, and a bundle of
    three tasks; half the language-modeling rows continue with the model's own greedy characters."""
    root = tmp_path_factory.mktemp('core')
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=256, vocab_size=len(CHARS), bias=False, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(20)
    model.eval()
    out = root / 'model'
    out.mkdir()
    torch.save({'model': model.state_dict(), 'optimizer': {}, 'iter_num': 0, 'best_val_loss': float('nan'), 'config': {},
                'model_args': {k: getattr(model.config, k) for k in GPTConfig.__dataclass_fields__}}, out / 'ckpt.pt')
    with open(out / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': len(CHARS), 'stoi': {c: i for i, c in enumerate(CHARS)},
                     'itos': dict(enumerate(CHARS))}, f)
    rng = random.Random(0)
    rows = {'mc': [dict(query=sent(rng, rng.randint(2, 6)) + '?', choices=[sent(rng, rng.randint(1, 3)) for _ in range(k)],
                        gold=rng.randrange(k)) for k in [3, 4] * 10],
            'schema': [dict(context_options=[sent(rng, rng.randint(2, 5)) for _ in range(2)], continuation=sent(rng, 3) + '.',
                            gold=rng.randrange(2)) for _ in range(20)],
            'lm': []}
    for i in range(20):
        context = sent(rng, rng.randint(3, 8)) + (' ' if i % 3 == 0 else '')  # trailing spaces are trimmed
        right = greedy(model, context.strip(), 3)
        rows['lm'].append(dict(context=context, continuation=right if i % 2 else right[:2] + ('a' if right[2] != 'a' else 'b')))
    (root / 'bundle' / 'eval_data' / 'x').mkdir(parents=True)
    yaml = 'icl_tasks:\n'
    for label, kind, shots, delimiter, _ in TASKS:
        (root / 'bundle' / 'eval_data' / 'x' / f'{label}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows[label]))
        yaml += (f"- label: {label}\n  dataset_uri: x/{label}.jsonl\n  num_fewshot: [{shots}]\n  icl_task_type: {kind}\n"
                 f"  continuation_delimiter: {json.dumps(delimiter)}\n")
    (root / 'bundle' / 'core.yaml').write_text(yaml)
    (root / 'bundle' / 'eval_meta_data.csv').write_text(
        'Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n' +
        ''.join(f'{label},x,{kind},{shots},20,{b},,"a test task, with a comma"\n' for label, kind, shots, _, b in TASKS))
    return dict(root=root, out=str(out), dir=str(root / 'bundle'), model=model, rows=rows)


@torch.no_grad()
def by_hand(model, label, kind, shots, delimiter, rows):
    """Whether each row is right, computed without tasks/core.py."""
    rows = list(rows)
    random.Random(1337).shuffle(rows)
    right = []
    for i, item in enumerate(rows):
        others = [rows[j] for j in random.Random(1234 + i).sample([j for j in range(len(rows)) if j != i], shots)] if shots else []
        if kind == 'multiple_choice':
            head = ''.join(s['query'] + delimiter + s['choices'][s['gold']] + '\n\n' for s in others) + item['query'] + delimiter
            whole = [head + c for c in item['choices']]
            cut = [len(os.path.commonprefix(whole))] * len(whole)
        elif kind == 'schema':
            whole = [''.join(s['context_options'][s['gold']] + delimiter + s['continuation'] + '\n\n' for s in others)
                     + o + delimiter + item['continuation'] for o in item['context_options']]
            n = len(os.path.commonprefix([w[::-1] for w in whole]))
            cut = [len(w) - n for w in whole]
        else:
            prompt = item['context'].strip() + delimiter
            whole, cut = [prompt + item['continuation']], [len(prompt.strip())]
        losses, hits = [], []
        for text, start in zip(whole, cut):
            ids = torch.tensor([[CHARS.index(c) for c in text]])
            logits, _ = model(ids[:, :-1], ids[:, 1:])  # targets given: logits at every position
            logp = logits[0].log_softmax(-1)[start - 1:]
            targets = ids[0, start:]
            losses.append(-logp.gather(1, targets[:, None]).mean().item())
            hits.append(bool((logp.argmax(-1) == targets).all()))
        right.append(hits[0] if kind == 'language_modeling' else losses.index(min(losses)) == item['gold'])
    return right


def test_prompts_of_each_kind():
    mc = core.texts('multiple_choice', dict(query='Q?', choices=['x', 'y'], gold=0), [dict(query='A?', choices=['b', 'c'], gold=1)], ': ')
    assert mc == ['A?: c\n\nQ?: x', 'A?: c\n\nQ?: y']
    schema = core.texts('schema', dict(context_options=['p', 'q'], continuation='r'), [dict(context_options=['s', 't'], gold=0, continuation='u')], ' ')
    assert schema == ['s u\n\np r', 's u\n\nq r']
    lm = core.texts('language_modeling', dict(context=' Paris is in ', continuation='France'), [dict(context='Rome is in ', continuation='Italy')], ' ')
    assert lm == ['Rome is in Italy\n\nParis is in', 'Rome is in Italy\n\nParis is in France']
    picks = core.shots_of(5, 2, 4)
    assert sorted(picks) == [0, 1, 3, 4] and picks == core.shots_of(5, 2, 4) and core.shots_of(5, 2, 0) == []


def test_scores_equal_hand_computation(bundle, one_thread):
    tasks = core.load_bundle(bundle['dir'])
    assert [(t['label'], t['kind'], t['shots'], t['delimiter'], t['baseline']) for t in tasks] == [(*t[:4], t[4] / 100) for t in TASKS]
    itos = {c: i for i, c in enumerate(CHARS)}
    centered = []
    for task, spec in zip(tasks, TASKS):
        acc, right = core.evaluate(bundle['model'], task, lambda s: [itos[c] for c in s], None, len(CHARS))
        assert right == by_hand(bundle['model'], *spec[:4], bundle['rows'][spec[0]]), spec[0]
        assert 0 < acc < 1 and acc == sum(right) / 20
        centered.append((acc - spec[4] / 100) / (1 - spec[4] / 100))
    assert tasks[2]['label'] == 'lm' and core.evaluate(bundle['model'], tasks[2], lambda s: [itos[c] for c in s], None, len(CHARS))[0] == 0.5
    bundle['core'] = sum(centered) / 3
    bundle['centered'] = centered


def test_command_line_table_json_and_errors(bundle, tmp_path):
    if 'core' not in bundle:
        test_scores_equal_hand_computation(bundle, None)
    proc = run_script(REPO / 'chat_eval.py', f"--out_dir={bundle['out']}", '--task=core', f"--data_dir={bundle['dir']}",
                      f'--json_out={tmp_path / "r.json"}', '--device=cpu', '--dtype=float32', env={'OMP_NUM_THREADS': '1'})
    result = json.loads((tmp_path / 'r.json').read_text())['core']
    assert abs(result['core'] - bundle['core']) < 1e-12 and result['n'] == 60
    for (label, *_), c in zip(TASKS, bundle['centered']):
        assert abs(result['tasks'][label]['centered'] - c) < 1e-12
        assert any(line.split()[:1] == [label] for line in proc.stdout.splitlines())
    assert f"{bundle['core']:.4f}" in [line.split()[-1] for line in proc.stdout.splitlines() if line.startswith('CORE')]
    limited = run_script(REPO / 'chat_eval.py', f"--out_dir={bundle['out']}", '--task=core', f"--data_dir={bundle['dir']}",
                         '--limit=5', '--device=cpu', '--dtype=float32', env={'OMP_NUM_THREADS': '1'})
    assert [line.split()[3] for line in limited.stdout.splitlines() if line.split()[:1] in (['mc'], ['schema'], ['lm'])] == ['5'] * 3
    for args, says in (([f"--data_dir={tmp_path}"], 'not a CORE eval bundle'), (['--limit=2'], 'cannot give each'),
                       (['--url=http://127.0.0.1:1'], 'run in process')):
        proc = run_script(REPO / 'chat_eval.py', f"--out_dir={bundle['out']}", '--task=core', f"--data_dir={bundle['dir']}",
                          *args, '--device=cpu', check=False, env={'OMP_NUM_THREADS': '1'})
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and says in lines[0], (args, proc.stderr)


def test_download_unpacks_the_bundle_once(bundle, tmp_path, monkeypatch):
    """download() fetches the zip (here a file:// URL standing in for nanochat's), unpacks its eval_bundle/ folder
    to the destination whole, and load_bundle reads it as the local copy."""
    import shutil
    # the archive holds eval_bundle/...: as nanochat's does
    shutil.copytree(bundle['dir'], tmp_path / 'src' / 'eval_bundle')
    shutil.make_archive(str(tmp_path / 'real'), 'zip', tmp_path / 'src', 'eval_bundle')
    monkeypatch.setattr(core, 'BUNDLE_URL', (tmp_path / 'real.zip').as_uri())
    dest = tmp_path / 'cache' / 'core_eval_bundle'
    core.download(str(dest))
    assert sorted(os.listdir(dest)) == ['core.yaml', 'eval_data', 'eval_meta_data.csv']
    assert [t['label'] for t in core.load_bundle(str(dest))] == ['mc', 'schema', 'lm']
    assert os.listdir(tmp_path / 'cache') == ['core_eval_bundle']  # no temporary left beside it
