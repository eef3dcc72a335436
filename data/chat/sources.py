"""
Conversations from the hub's chat and benchmark datasets, for data/chat/prepare.py --mix. Each
source is a converter from one row of its dataset, in the hub's own schema, to a conversation
[(role, content), ...] (tokenizer.py's form). The same converters read a local file in that schema
(.parquet, .json/.jsonl or .csv, through the datasets library), which is how they run offline.

    smoltalk       HuggingFaceTB/smol-smoltalk  messages: [{role, content}], as it is
    gsm8k          openai/gsm8k (main)          question, answer: each <<expr=result>> becomes a calculator
                                                call and its output; the reply ends with its '#### N' line
    arc_easy       allenai/ai2_arc (ARC-Easy)   question, choices {text, label}, answerKey: the reply is the letter
    arc_challenge  allenai/ai2_arc (ARC-Challenge)
    mmlu           cais/mmlu (all)              question, choices, answer (0-3): the reply is the letter
"""
import os
import re

from tokenizer import conversation_of


def smoltalk(row):
    return conversation_of({'messages': row['messages']})


def gsm8k(row):
    parts = []
    for piece in re.split(r'(<<[^<>]*>>)', row['answer']):
        if piece.startswith('<<') and piece.endswith('>>') and '=' in piece:
            expression, result = piece[2:-2].rsplit('=', 1)
            parts += [{'type': 'python', 'text': expression}, {'type': 'python_output', 'text': result}]
        elif piece:
            parts.append({'type': 'text', 'text': piece})
    return [('user', row['question']), ('assistant', parts)]


def multiple_choice(question, letters, choices):
    # each choice on its own line after its letter: the reply's letter is the same token as in the question
    lines = [question, *(f"{letter}: {choice}" for letter, choice in zip(letters, choices)),
             "Reply with the letter of the correct choice."]
    return '\n'.join(lines)


def arc(row):
    letters = list(row['choices']['label'])
    if row['answerKey'] not in letters:
        raise ValueError(f"answerKey {row['answerKey']!r} is not one of the labels {letters}")
    return [('user', multiple_choice(row['question'], letters, row['choices']['text'])), ('assistant', row['answerKey'])]


def mmlu(row):
    letters = 'ABCD'[:len(row['choices'])]
    answer = row['answer'] if isinstance(row['answer'], str) else letters[row['answer']]  # a ClassLabel: 0-3
    return [('user', multiple_choice(row['question'], letters, row['choices'])), ('assistant', answer)]


# name: (hub dataset, its config, train split, held-out split, converter)
HUB = {
    'smoltalk': ('HuggingFaceTB/smol-smoltalk', None, 'train', 'test', smoltalk),
    'gsm8k': ('openai/gsm8k', 'main', 'train', 'test', gsm8k),
    'arc_easy': ('allenai/ai2_arc', 'ARC-Easy', 'train', 'validation', arc),
    'arc_challenge': ('allenai/ai2_arc', 'ARC-Challenge', 'train', 'validation', arc),
    'mmlu': ('cais/mmlu', 'all', 'auxiliary_train', 'validation', mmlu),
}
FILE_TYPES = {'.parquet': 'parquet', '.json': 'json', '.jsonl': 'json', '.csv': 'csv'}


def rows_of(name, path=None, split='train'):
    """The rows of a source: a local file in the hub's schema, or the hub dataset's split."""
    import datasets
    try:
        if path:
            kind = FILE_TYPES.get(os.path.splitext(path)[1])
            if kind is None:
                raise ValueError(f"a {name} file must end in {', '.join(FILE_TYPES)}")
            if not os.path.isfile(path):
                raise ValueError("no such file")
            return datasets.load_dataset(kind, data_files=path, split='train')
        hub, config, *_ = HUB[name]
        return datasets.load_dataset(hub, config, split=split)
    except Exception as e:  # a missing file, no network, a dataset that moved
        raise ValueError(f"cannot read {path or HUB[name][0]}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def conversations(name, path=None, split='train', limit=None):
    """The conversations of a source, through its converter; ValueError naming a row that does not fit."""
    convert = HUB[name][4]
    out = []
    for i, row in enumerate(rows_of(name, path, split)):
        if limit is not None and i >= limit:
            break
        try:
            out.append(convert(row))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"{path or HUB[name][0]} row {i}: not in {name}'s schema ({type(e).__name__}: {e})")
    return out
