"""
The report card of a speedrun.sh run, nanochat's report.md: per stage the command and its wall time, the tokens
it trained on, the parameters, the final train/val loss and bits per byte; each model's scores (CORE for base and
mid, the built-in tasks' held-out accuracy and their mean, the hub's ChatCORE on a GPU run, bits per byte on
SFT's held-out replies); the hardware, PyTorch and the git commit. Every figure is read from what the run left
in its folder: stages/<stage>.json (command, wall time), logs/<stage>.log (train.py's and rl.py's log lines),
<stage>/ckpt.pt (parameters, settings) and eval/<model>-<what>.json (chat_eval.py --json_out).

$ python report.py --out=out-speedrun      # writes out-speedrun/report.md (speedrun.sh runs it last)
"""
import json
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np
import torch

from checkpoint import load_checkpoint
from configurator import configure, fail
from tokenizer import read_meta, tokenizer_from_meta

# -----------------------------------------------------------------------------
out = 'out-speedrun'  # speedrun.sh's OUT
# -----------------------------------------------------------------------------
configure(globals())
STAGES = ['tok', 'base', 'mid', 'sft', 'rl', 'eval']
MODELS = ['base', 'mid', 'sft', 'rl']
BUILT_IN = ['arith', 'products']
NOT_RUN = 'not run'


def read_json(*parts):
    path = os.path.join(out, *parts)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def log_lines(stage):
    path = os.path.join(out, 'logs', f'{stage}.log')
    return open(path, encoding='utf-8', errors='replace').read().splitlines() if os.path.exists(path) else []


def duration(seconds):
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s" if seconds >= 60 else f"{seconds:.1f} s"


def count(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def params_and_config(stage):
    """The model's parameter count (tied weights once) and its run's settings, from its checkpoint."""
    try:
        model, checkpoint = load_checkpoint(os.path.join(out, stage), 'cpu')
    except (FileNotFoundError, ValueError) as e:
        return None, {}, str(e)
    return sum(p.numel() for p in model.parameters()), checkpoint.get('config') or {}, None


def train_row(stage):
    """tokens seen, parameters, final train loss, val loss, val bpb of a train.py stage, from its log."""
    lines = log_lines(stage)
    per_iter = [int(m[1].replace(',', '')) for m in (re.search(r'tokens per iteration will be: ([\d,]+)', x) for x in lines) if m]
    evals = [m for m in (re.match(r'step (\d+): train loss ([\d.]+), val loss ([\d.]+)(?:, val bpb ([\d.]+))?', x)
                         for x in lines) if m]
    params, _, _ = params_and_config(stage)
    if not per_iter or not evals or params is None:
        return [NOT_RUN] * 5
    last = evals[-1]
    return [count(int(last[1]) * per_iter[-1]), count(params), last[2], last[3], last[4] or 'no tokenizer bytes']


def rl_row():
    """rl.py: the tokens it sampled (reply lengths x replies a step), parameters, the final steps' mean reward in
    place of a train loss, and the loss and bits per byte of SFT's held-out replies (eval/rl-bpb.json)."""
    steps = [m for m in (re.match(r'iter (\d+): reward ([\d.]+), reply length ([\d.]+)', x) for x in log_lines('rl')) if m]
    params, config, _ = params_and_config('rl')
    bpb = (read_json('eval', 'rl-scores.json') or {}).get('bpb')
    if not steps or params is None or bpb is None:
        return [NOT_RUN] * 5
    replies = config.get('questions_per_step', 0) * config.get('samples_per_question', 0) * config.get('log_interval', 1)
    tail = steps[-10:]
    reward = sum(float(m[2]) for m in tail) / len(tail)
    return [count(round(sum(float(m[3]) for m in steps) * replies)) + ' sampled', count(params),
            f"reward {reward:.4f} (last {len(tail)} steps)", f"{bpb['loss']:.4f} (SFT val)", f"{bpb['bpb']:.4f}"]


def score_row(model):
    """CORE, each built-in task's held-out accuracy, their mean, the hub's centered mean, the chat bpb."""
    scores = read_json('eval', f'{model}-scores.json') or {}
    row = [f"{scores['core']['core']:.4f}" if 'core' in scores else ('-' if model in ('sft', 'rl') else NOT_RUN)]
    accs = []
    for task in BUILT_IN:
        result = read_json('eval', f'{model}-{task}.json')
        accs.append(result['jsonl']['acc'] if result else None)
        row.append(f"{accs[-1]:.4f} ({result['jsonl']['n']})" if result else NOT_RUN)
    row.append(f"{sum(accs) / len(accs):.4f}" if None not in accs else NOT_RUN)
    if hub_tasks:
        row += [f"{scores[t]['acc']:.4f}" if t in scores else NOT_RUN for t in hub_tasks]
        row.append(f"{scores['centered_mean']['value']:.4f}" if 'centered_mean' in scores else NOT_RUN)
    row.append(f"{scores['bpb']['bpb']:.4f}" if scores.get('bpb', {}).get('bpb') is not None else NOT_RUN)
    return row


def table(header, rows):
    cell = lambda v: str(v).replace('|', '\\|').replace('\n', ' ')  # noqa: E731
    return '\n'.join(['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)] +
                     ['| ' + ' | '.join(cell(v) for v in row) + ' |' for row in rows]) + '\n'


def tokenizer_line():
    """The tokenizer the run trained or took, and the base data's size in its tokens."""
    data = os.path.join(out, 'data', 'base')
    try:
        meta = read_meta(os.path.join(data, 'meta.pkl'))
        tok = tokenizer_from_meta(meta)
    except (OSError, ValueError, KeyError) as e:
        return f"{NOT_RUN} ({e})"
    item = np.dtype(meta.get('dtype', 'uint16')).itemsize
    sizes = [os.path.getsize(os.path.join(data, f'{split}.bin')) // item for split in ('train', 'val')]
    return (f"{tok.name}, {tok.n_vocab:,} tokens ({len(tok.special_tokens)} chat and tool tokens); base data: "
            f"{count(sizes[0])} train tokens, {count(sizes[1])} val tokens")


def hardware():
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    what = f"{cpu}, {os.cpu_count()} cores"
    if gpus:
        what += ', ' + ', '.join(f"{gpus.count(g)} x {g}" for g in sorted(set(gpus)))
    return what


def commit():
    repo = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(['git', '-C', repo, 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(['git', '-C', repo, 'status', '--porcelain', '--untracked-files=no'], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'not a git checkout'
    return head + (' (with uncommitted changes)' if dirty else '')


if not os.path.isdir(os.path.join(out, 'stages')):
    fail(f"{out} holds no speedrun.sh run (no stages/ folder)")
marks = {s: read_json('stages', f'{s}.json') for s in STAGES}
size = next((m['size'] for m in marks.values() if m), '?')
hub_tasks = []
for model in MODELS:  # the hub's benchmarks some model was scored on (the GPU run)
    for task in (read_json('eval', f'{model}-scores.json') or {}):
        if task not in ('bpb', 'core', 'centered_mean') and task not in hub_tasks:
            hub_tasks.append(task)

report = [f"# speedrun report card\n\n"
          f"- run: `{out}` ({size} run), {sum(1 for m in marks.values() if m)} of {len(STAGES)} stages done, "
          f"{duration(sum(m['wall_s'] for m in marks.values() if m))} in all\n"
          f"- hardware: {hardware()}\n"
          f"- software: PyTorch {torch.__version__}, Python {platform.python_version()}, {platform.system()} {platform.release()}\n"
          f"- commit: {commit()}\n"
          f"- written: {time.strftime('%Y-%m-%d %H:%M:%S')}\n"]
report.append("\n## Stages\n\n" + table(['stage', 'command', 'wall time', 'finished'],
                                         [[s, f"`{m['command']}`" if m else NOT_RUN, duration(m['wall_s']) if m else NOT_RUN,
                                           m['finished'] if m else NOT_RUN] for s, m in marks.items()]))
report.append(f"\n## Tokenizer\n\n{tokenizer_line()}\n")
report.append("\n## Training\n\nTokens seen: iterations x tokens per iteration (RL: tokens sampled). Losses: the last "
              "evaluation's (train.py: mean over eval_iters batches; mid: every token, SFT: the replies'); bits per "
              "byte of the val split's counted tokens.\n\n" +
              table(['stage', 'tokens seen', 'parameters', 'final train loss', 'final val loss', 'val bits per byte'],
                    [[s, *train_row(s)] for s in ('base', 'mid', 'sft')] + [['rl', *rl_row()]]))
header = ['model', 'CORE', *(f"{t} (n)" for t in BUILT_IN), 'built-in mean']
header += [*hub_tasks, 'ChatCORE'] if hub_tasks else []
report.append("\n## Scores\n\nCORE: DCLM's in-context tasks (chat_eval.py --task=core), base models only. Built-in: "
              "greedy replies to held-out questions of data/chat's tasks, right when the reply equals the reference "
              "(chance 0, so the mean is also their centered mean). Chat bpb: bits per byte of SFT's held-out "
              "replies.\n\n" + table(header + ['chat bpb'], [[m, *score_row(m)] for m in MODELS]))
cores = {m: (read_json('eval', f'{m}-scores.json') or {}).get('core') and read_json('eval', f'{m}-scores.json')
         for m in ('base', 'mid')}
if any(cores.values()):
    labels = list(next(c for c in cores.values() if c)['core']['tasks'])
    rows = []
    for label in labels:
        info = next(c['core']['tasks'][label] for c in cores.values() if c and label in c['core']['tasks'])
        rows.append([label, info['kind'], info['shots'], info['n']] +
                    [f"{c['core']['tasks'][label]['acc']:.4f} / {c['core']['tasks'][label]['centered']:.4f}"
                     if c and label in c['core']['tasks'] else NOT_RUN for c in cores.values()])
    report.append("\n## CORE by task\n\naccuracy / centered accuracy\n\n" +
                  table(['task', 'kind', 'shots', 'n', 'base', 'mid'], rows))
path = os.path.join(out, 'report.md')
with open(path + '.tmp', 'w') as f:
    f.write(''.join(report))
os.replace(path + '.tmp', path)
print(f"wrote {path}")
sys.stdout.flush()
