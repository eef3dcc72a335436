"""
speedrun.sh end to end at SMOKE size (a few iterations a stage, on the Tiny Shakespeare text and the built-in
chat tasks, CORE on a small bundle written here): report.md has every stage's row filled from what ran; a second
run skips every finished stage; a run stopped during RL (its marker and the evaluation's gone, a partial out_dir
left) redoes only RL and the evaluation; one stage alone (--stage=); bad arguments are one line.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SHAKESPEARE

STAGES = ['tok', 'base', 'mid', 'sft', 'rl', 'eval']


def speedrun(out, *args, **env):
    full = dict(os.environ, OUT=str(out), SMOKE='1', SIZE='cpu', OMP_NUM_THREADS='1', BASE_TEXT=str(SHAKESPEARE))
    full.update(env)
    return subprocess.run(['bash', str(REPO / 'speedrun.sh'), *args], capture_output=True, text=True, env=full, timeout=600)


def write_bundle(root):
    """Three tiny CORE tasks in DCLM's format, one of each kind."""
    rows = {'mc': [dict(query=f"Question {i}: which?", choices=['red', 'green', 'blue'], gold=i % 3) for i in range(8)],
            'schema': [dict(context_options=[f'The cat {i}', f'The dog {i}'], continuation='sat.', gold=i % 2) for i in range(8)],
            'lm': [dict(context=f'One two three {i}', continuation=' four') for i in range(8)]}
    (root / 'eval_data').mkdir(parents=True)
    for name, r in rows.items():
        (root / 'eval_data' / f'{name}.jsonl').write_text(''.join(json.dumps(x) + '\n' for x in r))
    (root / 'core.yaml').write_text(
        'icl_tasks:\n- label: mc\n  dataset_uri: mc.jsonl\n  num_fewshot: [2]\n  icl_task_type: multiple_choice\n'
        '  continuation_delimiter: "\\nAnswer: "\n- label: schema\n  dataset_uri: schema.jsonl\n  num_fewshot: [1]\n'
        '  icl_task_type: schema\n- label: lm\n  dataset_uri: lm.jsonl\n  num_fewshot: [0]\n  icl_task_type: language_modeling\n')
    (root / 'eval_meta_data.csv').write_text('Eval Task,Random baseline\nmc,33.3\nschema,50\nlm,0\n')
    return root


def tables(report):
    """{section: [row cells]} of report.md's tables."""
    out, section = {}, None
    for line in report.splitlines():
        if line.startswith('## '):
            section = line[3:]
        elif line.startswith('| ') and section:
            out.setdefault(section, []).append([c.strip() for c in line.strip('|').split(' | ')])
    return {k: v[1:] for k, v in out.items()}  # the header row off


def mtimes(out):
    return {p: os.path.getmtime(out / p) for p in ('base/ckpt.pt', 'mid/ckpt.pt', 'sft/ckpt.pt', 'rl/ckpt.pt', 'data/base/train.bin')}


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="../shared/data/tinyshakespeare/input.txt not present")
def test_speedrun_report_resume_and_stages(tmp_path):
    out, bundle = tmp_path / 'run', write_bundle(tmp_path / 'bundle')
    proc = speedrun(out, CORE_DIR=str(bundle))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / 'report.md').read_text()
    t = tables(report)
    assert [r[0] for r in t['Stages']] == STAGES and [r[0] for r in t['Training']] == ['base', 'mid', 'sft', 'rl']
    assert [r[0] for r in t['Scores']] == ['base', 'mid', 'sft', 'rl'] and [r[0] for r in t['CORE by task']] == ['mc', 'schema', 'lm']
    for section, rows in t.items():
        for row in rows:
            assert all(c and 'not run' not in c for c in row), (section, row)
    for row in t['Training']:  # tokens seen, parameters, losses, bits per byte: numbers from the run
        assert re.match(r'[\d,.]+[MB]?( sampled)?$', row[1]) and re.match(r'[\d,.]+[MB]?$', row[2]), row
        assert all(re.search(r'\d\.\d{4}', c) for c in row[3:]), row
    for row in t['Stages']:
        assert row[1].startswith('`') and re.match(r'[\d.]+ s$|\d+ min', row[2]), row
    assert 'speedrun_cpu_mid.py' in t['Stages'][2][1] and 'speedrun_cpu_sft.py' in t['Stages'][3][1]
    configs = {s: torch.load(out / s / 'ckpt.pt', weights_only=True)['config'] for s in ('mid', 'sft')}
    assert (configs['mid']['chat_loss'], configs['sft']['chat_loss']) == ('all', 'replies')  # midtraining, then SFT
    assert re.match(r'-?\d\.\d{4}$', t['Scores'][0][1]) and t['Scores'][2][1] == '-'  # CORE: base and mid only
    assert 'PyTorch' in report and re.search(r'commit: [0-9a-f]{40}', report) and 'cores' in report
    marks = {s: json.loads((out / 'stages' / f'{s}.json').read_text()) for s in STAGES}
    assert all(m['wall_s'] > 0 for m in marks.values())
    # every stage's model loads in sample.py: the base model continues text, the later ones chat
    for model in ('base', 'mid', 'sft', 'rl'):
        args = ['--start=To be', '--num_samples=1'] if model == 'base' else ['--chat=True']
        sample = subprocess.run([sys.executable, str(REPO / 'sample.py'), f'--out_dir={out / model}', '--device=cpu',
                                 '--max_new_tokens=8', *args], input='What is 12 + 34?\n', capture_output=True, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=120)
        assert sample.returncode == 0 and sample.stdout.strip(), (model, sample.stderr[-1000:])

    # again: every stage skipped, nothing rewritten, the report written again
    before = mtimes(out)
    again = speedrun(out, CORE_DIR=str(bundle))
    assert again.returncode == 0 and all(f"== {s}: done" in again.stdout for s in STAGES), again.stdout[-2000:]
    assert mtimes(out) == before and (out / 'report.md').read_text().split('- written')[0] == report.split('- written')[0]

    # stopped during RL: its marker and the evaluation's are missing, a partial rl/ is left
    (out / 'stages' / 'rl.json').unlink()
    (out / 'stages' / 'eval.json').unlink()
    (out / 'rl' / 'ckpt.pt').write_bytes(b'partial')
    resumed = speedrun(out, CORE_DIR=str(bundle))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert all(f"== {s}: done" in resumed.stdout for s in STAGES[:4]) and "== rl: python" in resumed.stdout
    after = mtimes(out)
    assert all(after[p] == before[p] for p in before if not p.startswith('rl/')) and after['rl/ckpt.pt'] != before['rl/ckpt.pt']
    assert (out / 'stages' / 'eval.json').exists() and 'not run' not in (out / 'report.md').read_text()

    # one stage alone: the others are not touched
    alone = speedrun(out, '--stage=tok', CORE_DIR=str(bundle))
    assert alone.returncode == 0 and '== tok: python' in alone.stdout and '== base' not in alone.stdout
    for args, env in ((['--stage=nope'], {}), (['--bogus'], {}), ([], {'SIZE': 'tpu'})):
        bad = speedrun(out, *args, **env)
        assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and bad.stderr.startswith('error: '), bad.stderr


def test_midtraining_counts_every_token(tmp_path):
    """chat_loss='all' (midtraining): the loss over every token of the conversations; 'replies' (SFT, the
    default): over the assistant's tokens only. Each run's full val loss equals windowed_loss on its checkpoint
    with the mask or without; a bad value is one line."""
    import numpy as np
    from checkpoint import load_checkpoint
    from tasks.bpb import windowed_loss
    run = lambda *a, **kw: subprocess.run([sys.executable, *map(str, a)], cwd=tmp_path, capture_output=True, text=True,  # noqa: E731
                                          env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=300, **kw)
    prep = run(REPO / 'data/chat/prepare.py', '--task=arith', '--n_train=300', '--n_val=30', '--vocab_size=300',
               f'--out_dir={tmp_path / "data" / "chat"}')
    assert prep.returncode == 0, prep.stderr
    data = np.memmap(tmp_path / 'data/chat/val.bin', dtype=np.uint16, mode='r')
    mask = np.memmap(tmp_path / 'data/chat/val_mask.bin', dtype=np.uint8, mode='r')
    assert 0 < (mask == 1).mean() < 0.9
    losses = {}
    for how in ('all', 'replies'):
        proc = run(REPO / 'train.py', '--dataset=chat', f'--out_dir=out-{how}', f'--chat_loss={how}', '--device=cpu',
                   '--compile=False', '--dtype=float32', '--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=64',
                   '--batch_size=4', '--max_iters=3', '--eval_interval=3', '--eval_iters=2', '--warmup_iters=1',
                   '--eval_full_val=True')
        assert proc.returncode == 0, proc.stderr[-2000:]
        losses[how] = float(re.search(r'full val loss ([\d.]+)', proc.stdout)[1])
        model, _ = load_checkpoint(tmp_path / f'out-{how}', 'cpu')
        model.eval()
        expected, _ = windowed_loss(model, data, 64, 4, 'cpu', mask=None if how == 'all' else mask)
        assert abs(losses[how] - expected) < 1e-3, (how, losses[how], expected)
    bad = run(REPO / 'train.py', '--dataset=chat', '--chat_loss=prompts', '--device=cpu')
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == ["error: chat_loss must be 'replies' or 'all', not 'prompts'"]
