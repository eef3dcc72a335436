"""
CORE (DCLM, Li et al. 2024; nanochat's base-model metric): in-context tasks read from DCLM's eval bundle,
each scored as accuracy centered by its random baseline, (acc - b) / (1 - b), and averaged. The bundle:
core.yaml (icl_tasks: label, dataset_uri, num_fewshot [n], icl_task_type, continuation_delimiter),
eval_data/<dataset_uri> (jsonl rows) and eval_meta_data.csv ('Eval Task', 'Random baseline' in percent).
Three kinds of task, each row scored from one forward of its sequences (a beginning-of-text token first):
  multiple_choice  {query, choices, gold}: one context, a sequence per choice; the choice whose tokens after
                   the choices' common prefix have the lowest mean loss is the answer
  schema           {context_options, continuation, gold}: a sequence per context, one continuation; the
                   context under which the common suffix (the continuation) has the lowest mean loss
  language_modeling {context, continuation}: right when every continuation token is the model's greedy pick
Few-shot examples are other rows of the same task, drawn with random.Random(1234 + the row's index), after
the rows are shuffled with random.Random(1337) (so a `limit` takes the same rows nanochat's max-per-task does).
"""
import csv
import json
import os
import random
import shutil
import tempfile
import urllib.request
import zipfile

import torch
import torch.nn.functional as F

BUNDLE_URL = 'https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip'  # nanochat's copy of DCLM's
DEFAULT_DIR = os.path.join(os.path.expanduser(os.environ.get('XDG_CACHE_HOME', '~/.cache')), 'core_eval_bundle')
KINDS = ('multiple_choice', 'schema', 'language_modeling')


def download(data_dir):
    """The bundle into data_dir, once; OSError when it cannot be fetched."""
    os.makedirs(os.path.dirname(os.path.abspath(data_dir)), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(data_dir))) as tmp:
        archive = os.path.join(tmp, 'eval_bundle.zip')
        print(f"downloading {BUNDLE_URL} to {data_dir}")
        with urllib.request.urlopen(BUNDLE_URL, timeout=600) as r, open(archive, 'wb') as f:
            shutil.copyfileobj(r, f)
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
        os.replace(os.path.join(tmp, 'eval_bundle'), data_dir)  # whole or not at all


def load_bundle(data_dir):
    """[{label, kind, shots, delimiter, rows, baseline (a fraction)}] in core.yaml's order; ValueError naming
    what is missing or malformed."""
    import yaml  # transformers' dependency: only CORE reads YAML
    try:
        with open(os.path.join(data_dir, 'core.yaml'), encoding='utf-8') as f:
            entries = yaml.safe_load(f)['icl_tasks']
        with open(os.path.join(data_dir, 'eval_meta_data.csv'), encoding='utf-8') as f:
            baselines = {row['Eval Task']: float(row['Random baseline']) for row in csv.DictReader(f)}
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as e:
        raise ValueError(f"{data_dir} is not a CORE eval bundle (core.yaml, eval_meta_data.csv): {type(e).__name__}: {e}") from None
    tasks = []
    for entry in entries:
        label, kind = entry.get('label'), entry.get('icl_task_type')
        if kind not in KINDS:
            raise ValueError(f"{data_dir}/core.yaml: task {label!r} has icl_task_type {kind!r}, not one of {', '.join(KINDS)}")
        if label not in baselines:
            raise ValueError(f"{data_dir}/eval_meta_data.csv has no random baseline for {label!r}")
        path = os.path.join(data_dir, 'eval_data', entry['dataset_uri'])
        try:
            with open(path, encoding='utf-8') as f:
                rows = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None
        random.Random(1337).shuffle(rows)
        shots = entry.get('num_fewshot', [0])
        tasks.append(dict(label=label, kind=kind, shots=int(shots[0] if isinstance(shots, list) else shots),
                          delimiter=entry.get('continuation_delimiter', ' '), rows=rows, baseline=baselines[label] / 100))
    return tasks


def shots_of(n_rows, i, n):
    """The indices of row i's n few-shot examples among n_rows rows: never row i itself."""
    return random.Random(1234 + i).sample([j for j in range(n_rows) if j != i], n) if n else []


def texts(kind, item, shots, delimiter):
    """The texts one row is scored on: a choice's, a context option's, or (language modeling) the prompt
    without, then with, its continuation."""
    if kind == 'multiple_choice':
        head = ''.join(f"{s['query']}{delimiter}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{head}{item['query']}{delimiter}{choice}" for choice in item['choices']]
    if kind == 'schema':
        head = ''.join(f"{s['context_options'][s['gold']]}{delimiter}{s['continuation']}\n\n" for s in shots)
        return [f"{head}{option}{delimiter}{item['continuation']}" for option in item['context_options']]
    head = ''.join(f"{s['context'].strip()}{delimiter}{s['continuation']}\n\n" for s in shots)
    prompt = f"{head}{item['context'].strip()}{delimiter}"
    # the prompt alone loses trailing whitespace (a delimiter's space), which then starts the continuation's tokens
    return [prompt.strip(), prompt + item['continuation']]


def common_length(seqs, from_end=False):
    """How many leading (trailing) tokens all seqs share."""
    n = 0
    for column in zip(*(reversed(s) if from_end else s for s in seqs)):
        if any(t != column[0] for t in column):
            break
        n += 1
    return n


def sequences(kind, item_texts, encode, bos):
    """[(ids, start)]: each text's ids (bos first, unless None) and where its scored tokens start (they run to
    its end)."""
    ids = [([bos] if bos is not None else []) + encode(t) for t in item_texts]
    if kind == 'multiple_choice':
        return [(s, common_length(ids)) for s in ids]
    if kind == 'schema':
        n = common_length(ids, from_end=True)
        return [(s, len(s) - n) for s in ids]
    without, whole = ids
    if whole[:len(without)] != without or len(whole) == len(without):
        raise ValueError(f"the prompt's tokens are not a prefix of the prompt and continuation's: {item_texts[0][-40:]!r}")
    return [(whole, len(without))]


@torch.no_grad()
def score(model, seqs, vocab_size):
    """[(mean loss of the scored tokens, whether each is the greedy pick)] for [(ids, start)], in one forward
    (padded on the right, which causal attention never sees); a sequence past the model's context keeps its
    last block_size tokens."""
    device = model.transformer.wte.weight.device
    block = model.config.block_size
    cropped = [(s[-block:], max(1, start - max(0, len(s) - block))) for s, start in seqs]
    width = max(len(s) for s, _ in cropped)
    idx = torch.tensor([s + [0] * (width - len(s)) for s, _ in cropped], device=device)
    logits = model.logits(model.hidden_states(idx)).float()
    logits[..., vocab_size:] = float('-inf')  # a padded vocabulary's extra rows are no token
    out = []
    for row, (s, start) in enumerate(cropped):
        scored, targets = logits[row, start - 1:len(s) - 1], idx[row, start:len(s)]
        loss = F.cross_entropy(scored, targets, reduction='mean').item() if len(targets) else float('nan')
        out.append((loss, bool((scored.argmax(-1) == targets).all())))
    return out


def correct(kind, item, scores):
    if kind == 'language_modeling':
        return scores[0][1]
    losses = [loss for loss, _ in scores]
    return losses.index(min(losses)) == item['gold']  # the first of equal losses, as nanochat's list.index


def centered(acc, baseline):
    return (acc - baseline) / (1 - baseline)


def evaluate(model, task, encode, bos, vocab_size, limit=0):
    """(accuracy, [whether each row is right]) of one task of load_bundle's, on its first `limit` rows (0: all);
    few-shot examples come from the same rows."""
    rows = task['rows'][:limit or None]
    if len(rows) <= task['shots']:
        raise ValueError(f"{task['label']}: {len(rows)} rows cannot give each {task['shots']} few-shot examples of others")
    right = []
    for i, item in enumerate(rows):
        shots = [rows[j] for j in shots_of(len(rows), i, task['shots'])]
        seqs = sequences(task['kind'], texts(task['kind'], item, shots, task['delimiter']), encode, bos)
        right.append(correct(task['kind'], item, score(model, seqs, vocab_size)))
    return sum(right) / len(right), right
