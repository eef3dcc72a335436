"""
What the task files share: a hub dataset's rows (or local files in the same schema), few-shot examples
picked as lm-eval-harness picks them, and a multiple-choice question written as a chat turn.
"""
import os
import random

LETTERS = 'ABCDEFGHIJ'
FORMATS = {'.json': 'json', '.jsonl': 'json', '.parquet': 'parquet', '.csv': 'csv', '.arrow': 'arrow'}


def load_rows(path, name, split, data_files=''):
    """The rows (dicts) of split `split` of hub dataset `path` (config `name`), or of local files in its schema:
    data_files is a comma-separated list of paths or globs (.json/.jsonl, .parquet, .csv or .arrow, one kind).
    ValueError with a one-line reason."""
    try:
        from datasets import load_dataset
    except ImportError:  # optional at run time (requirements.txt): only the hub's benchmarks need it
        raise ValueError("the benchmark tasks read their data with Hugging Face's datasets: pip install datasets") from None
    files = [f for f in data_files.split(',') if f]
    kinds = {FORMATS.get(os.path.splitext(f)[1]) for f in files}
    if None in kinds or len(kinds) > 1:
        raise ValueError(f"data_files must be .json/.jsonl, .parquet, .csv or .arrow files of one kind, not {data_files!r}")
    try:
        if files:
            return list(load_dataset(kinds.pop(), data_files={split: files}, split=split))
        return list(load_dataset(path, name, split=split))
    except Exception as e:  # a missing file, no network, a split the dataset lacks
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise ValueError(f"cannot load {data_files or path} ({split}): {type(e).__name__}: {reason}") from None


def pick_shots(examples, pool, n, sampler):
    """n few-shot examples from pool for each example, as lm-eval-harness's samplers pick them: 'first' takes
    the first n of the same subject (MMLU's dev questions); 'random' draws with one random.Random(1234) across
    the examples in order; 'random_but_itself' draws n + 1 and drops the question itself (lm-eval-harness does
    so where a task has no test split, as HellaSwag)."""
    if n == 0:
        return [[] for _ in examples]
    if sampler == 'first':
        return [[s for s in pool if s.get('subject') == ex.get('subject')][:n] for ex in examples]
    if len(pool) < n + (sampler == 'random_but_itself'):
        raise ValueError(f"num_fewshot is {n} but the few-shot split has {len(pool)} examples")
    rng = random.Random(1234)
    if sampler == 'random':
        return [rng.sample(pool, n) for _ in examples]
    shots = []
    for ex in examples:
        picked = [s for s in rng.sample(pool, n + 1) if s != ex][:n]
        shots.append(picked if len(picked) == n else rng.sample([s for s in pool if s != ex], n))
    return shots


def with_shots(description, shots, query):
    """lm-eval-harness's prompt: the description, each shot's question, ' ' and answer, a blank line, then the question."""
    return description + ''.join(f"{s['query']} {s['shot_answer']}\n\n" for s in shots) + query


def multiple_choice(question, letters, options):
    """A multiple-choice question as a user's chat message; the reply is one letter. Each option comes before
    its letter, and the letter follows '=' with no space: the token the reply starts with is the same."""
    lines = ''.join(f"- {option}={letter}\n" for letter, option in zip(letters, options))
    return f"Multiple choice question: {question}\n{lines}\nAnswer with the letter of the correct option only."
