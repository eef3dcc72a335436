"""
Prepare conversations for chat fine-tuning: your own, or a built-in task that runs offline.

    python data/chat/prepare.py --input=conversations.jsonl        # one {"messages": [...]} per line
    python data/chat/prepare.py --task=arith                       # the built-in task, generated here
    python data/chat/prepare.py --mix=smoltalk,gsm8k*2,mmlu*0.1    # hub datasets mixed by epochs (sources.py)
    python train.py config/train_chat_demo.py

Each conversation ({"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}, OpenAI's
format) is rendered with the chat special tokens (tokenizer.render_chat's rendering) and written
to data/<dataset>/ as train.bin/val.bin, train_mask.bin/val_mask.bin (uint8, one per token: 1
where the token is one the model learns to produce, the assistant's replies) and meta.pkl, plus
train.jsonl/val.jsonl (in val.jsonl the last message is the reference reply, for chat_eval.py).
The tokenizer is a BPE trained here on the train conversations (tokenizer='bpe'), GPT-2's with
the special tokens appended ('gpt2'), or another dataset's (tokenizer_from='data/<name>'). With
template_from=<a transformers model directory or hub id>, the conversations are rendered with that
model's own tokenizer and chat template instead, to fine-tune it (config/finetune_smollm2.py).

The task 'arith' asks 2- and 3-digit additions and subtractions and how often a letter occurs
in a made-up word, each in several phrasings; the replies work it out digit by digit (letter by
letter) before the answer, which a small model learns far faster than the bare answer. The
held-out questions (val) never occur in train. Its hard variant 'products' asks products of two
3- to 5-digit numbers, which a small model cannot work out: the replies call the calculator
(<|python_start|>a*b<|python_end|><|output_start|>a*b's value<|output_end|>Answer: the value),
except, in train, some of those phrased 'What is a x b?' (products_direct); every val reply calls it.

--mix takes a comma-separated list of sources, each NAME[:FILE][*EPOCHS]: NAME is one of
sources.py's hub datasets (smoltalk, gsm8k, arc_easy, arc_challenge, mmlu), 'jsonl' (FILE
required) or a built-in task (arith, products); FILE reads a local file in the hub's schema
instead of downloading; EPOCHS (default 1, may be a fraction) is how many times its train
conversations appear. A hub dataset's val comes from its own held-out split (at most n_val
conversations), a FILE's from its last val_fraction, a task's are its n_val held-out questions.
"""
import json
import os
import random
import re
import sys

import numpy as np

# -----------------------------------------------------------------------------
input = ''  # a .jsonl file of conversations
task = ''  # 'arith' or 'products': generate a built-in task instead of reading --input
mix = ''  # instead: sources mixed by epochs, e.g. 'smoltalk,gsm8k*2,mmlu:mmlu.parquet*0.5' (see above)
n_train = 40000  # task conversations to train on
n_val = 500  # held-out task conversations (at most this many from a hub dataset's held-out split)
# products: how often a train question phrased 'What is a x b?' (one in 14) is answered without the calculator, as a
# person might write it: a model fine-tuned on that answers such questions without it, and wrong, which leaves
# reinforcement learning something to find (rl.py, make rl-demo); 0: every reply calls the calculator
products_direct = 0.6
tokenizer = 'bpe'  # 'bpe' (trained on the conversations) or 'gpt2' (GPT-2's, special tokens appended)
tokenizer_from = ''  # a dataset folder (data/<name>) whose meta.pkl tokenizer to use instead
template_from = ''  # a transformers model directory or hub id (a Llama model's): its tokenizer and chat template instead
vocab_size = 512  # with tokenizer='bpe': 256 bytes + merges + 9 special tokens
val_fraction = 0.1  # with --input (or a --mix FILE): the last 10% of the conversations are the validation set
dataset = 'chat'  # outputs go to data/<dataset>/
out_dir = ''  # write here instead of data/<dataset>/
seed = 1337
# -----------------------------------------------------------------------------
repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, repo_root)  # for configurator and tokenizer
from calculator import calculate
from configurator import configure, fail
from data.chat import sources
from data.prepare_common import print_compression, write_outputs
from tokenizer import (chat_tokens, content_text, gpt2_chat_meta, hf_tokenizer_meta, pretrained_dir, read_conversations,
                       read_meta, tokenizer_from_meta, train_bpe)
configure(globals())

# --- the built-in task ---------------------------------------------------------
ADD = ["What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}.", "{a} + {b} = ?", "What's the sum of {a} and {b}?"]
SUB = ["What is {a} - {b}?", "Subtract {b} from {a}.", "Compute {a} minus {b}.", "{a} - {b} = ?",
       "What's the difference between {a} and {b}?"]
COUNT = ["How many {l}'s are in {w}?", "Count the letter {l} in {w}.", "How many times does '{l}' appear in '{w}'?",
         "In the word {w}, how often does the letter {l} occur?"]


def digits(n, width):
    return [int(c) for c in str(n).rjust(width, '0')][::-1]  # ones first


def add_reply(a, b):
    # column by column from the ones, carry included: each step needs only the one before
    width, carry, steps = len(str(max(a, b))), 0, []
    for x, y in zip(digits(a, width), digits(b, width)):
        steps.append(f"{x}+{y}+{carry}={x + y + carry}")
        carry = (x + y + carry) // 10
    return f"{', '.join(steps)}. Answer: {a + b}"


def sub_reply(a, b):
    width, borrow, steps = len(str(a)), 0, []
    for x, y in zip(digits(a, width), digits(b, width)):
        d = x - y - borrow
        steps.append(f"{x}-{y}-{borrow}={d % 10}" + (" borrow" if d < 0 else ""))
        borrow = int(d < 0)
    return f"{', '.join(steps)}. Answer: {a - b}"


def count_reply(word, letter):
    # the counted letter first, then a line per letter of the word with the count so far: a letter
    # at the start of a line is a token of its own, the same token as the counted letter above
    steps, n = [], 0
    for c in word:
        n += c == letter
        steps.append(f"{c}={n}")
    return f"{letter}:\n" + '\n'.join(steps) + f"\nAnswer: {n}"


def make_word(rng):
    # made-up words of random letters: a held-out word is new, so the count must be worked out, not
    # recalled, and no pair of letters is common enough for the tokenizer to merge: a letter is a token
    return ''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(3, 6)))


def task_question(rng, train=False):
    """(key, question, reply): key identifies the question whatever its phrasing."""
    kind = rng.choices(range(3), weights=[3, 3, 4])[0]  # counting is the slowest to learn
    if kind == 2:
        word = make_word(rng)
        letter = rng.choice(word) if rng.random() < 0.75 else rng.choice('abcdefghijklmnopqrstuvwxyz')
        return ('count', word, letter), rng.choice(COUNT).format(l=letter, w=word), count_reply(word, letter)
    a, b = (rng.randint(10, 99) if rng.random() < 0.3 else rng.randint(100, 999) for _ in range(2))
    if kind == 0:
        return ('add', a, b), rng.choice(ADD).format(a=a, b=b), add_reply(a, b)
    a, b = max(a, b), min(a, b)
    return ('sub', a, b), rng.choice(SUB).format(a=a, b=b), sub_reply(a, b)


MUL = ["What is {a} * {b}?", "Multiply {a} by {b}.", "Compute {a} times {b}.", "What's the product of {a} and {b}?",
       "What is {a} x {b}?"]  # the last one in about 14 questions (see products_direct)


def product_question(rng, train=False):
    """The hard variant: a product of two 3- to 5-digit numbers, worked out by the calculator; in train, a
    question phrased 'What is a x b?' is answered without it products_direct of the time."""
    a, b = (rng.randint(10 ** (n - 1), 10 ** n - 1) for n in (rng.randint(3, 5), rng.randint(3, 5)))
    result = calculate(f"{a}*{b}")  # what the calculator will answer when the model runs
    reply = [{'type': 'python', 'text': f"{a}*{b}"}, {'type': 'python_output', 'text': result},
             {'type': 'text', 'text': f"Answer: {result}"}]
    phrasing = rng.choices(MUL, weights=[1, 1, 1, 1, 0.3])[0]
    if train and phrasing == MUL[-1] and rng.random() < products_direct:
        reply = f"Answer: {result}"
    return ('mul', a, b), phrasing.format(a=a, b=b), reply


TASKS = {'arith': task_question, 'products': product_question}


def make_task(name, n_train):
    question = TASKS[name]
    rng = random.Random(seed)
    val, held_out = [], set()
    while len(val) < n_val:
        key, q, r = question(rng)
        if key not in held_out:
            held_out.add(key)
            val.append([('user', q), ('assistant', r)])
    train = []
    while len(train) < n_train:
        key, q, r = question(rng, train=True)
        if key not in held_out:
            train.append([('user', q), ('assistant', r)])
    return train, val


def split_off_val(conversations, name):
    """A file's conversations: the last val_fraction of them (at least one) are its val."""
    if len(conversations) < 2:
        fail(f"{name} has {len(conversations)} conversation(s): at least 2 are needed (train and val)")
    n = max(1, int(len(conversations) * val_fraction))
    return conversations[:-n], conversations[-n:]


def read_mix(spec):
    """(train, val) of --mix: each source's train conversations EPOCHS times (a fraction: its first part), one after
    another (train.py samples windows at random), and each source's val."""
    train, val = [], []
    for entry in spec.split(','):
        m = re.fullmatch(r'\s*([a-z0-9_]+)(?::(.+?))?(?:\*([0-9]+(?:\.[0-9]*)?|\.[0-9]+))?\s*', entry)
        if not m or m[1] not in ('jsonl', *TASKS, *sources.HUB) or (m[1] == 'jsonl') > bool(m[2]) or (m[1] in TASKS and m[2]):
            fail(f"--mix entry '{entry}' is not NAME[:FILE][*EPOCHS] with NAME one of jsonl (with a FILE), "
                 f"{', '.join(TASKS)} (without one), {', '.join(sources.HUB)}")
        name, path, epochs = m[1], m[2], float(m[3] or 1)
        try:
            if name in TASKS:
                part_train, part_val = make_task(name, max(1, round(n_train * epochs)))
                epochs = 1  # the task makes as many as asked
            elif name == 'jsonl':
                part_train, part_val = split_off_val(read_conversations(path), path)
            elif path:
                part_train, part_val = split_off_val(sources.conversations(name, path), path)
            else:
                part_train = sources.conversations(name, split=sources.HUB[name][2])
                part_val = sources.conversations(name, split=sources.HUB[name][3], limit=n_val)
        except ValueError as e:
            fail(str(e))
        whole, fraction = divmod(epochs, 1)
        train += part_train * int(whole) + part_train[:round(len(part_train) * fraction)]
        val += part_val
        print(f"{name}{':' + path if path else ''}: {len(part_train):,} train conversations x {epochs:g}, {len(part_val):,} val")
    return train, val


# check the settings before touching any file
if sum(map(bool, (input, task, mix))) != 1:
    fail("give one of --input=<conversations.jsonl>, --task=arith|products or --mix=<sources>")
if task and task not in TASKS:
    fail(f"unknown task '{task}' (the built-in ones are {', '.join(TASKS)})")
if tokenizer not in ('bpe', 'gpt2'):
    fail(f"unknown tokenizer '{tokenizer}' (use 'bpe' or 'gpt2', or --tokenizer_from=data/<name>)")
if not 0 < val_fraction < 1:
    fail(f"val_fraction must be between 0 and 1, got {val_fraction}")
if not 0 <= products_direct <= 1:
    fail(f"products_direct must be between 0 and 1, not {products_direct}")
if n_train < 1 or n_val < 1:
    fail("n_train and n_val must be at least 1")
out_dir = out_dir or os.path.join(repo_root, 'data', dataset)

if mix:
    train, val = read_mix(mix)
elif task:
    train, val = make_task(task, n_train)
else:
    try:
        conversations = read_conversations(input)
    except ValueError as e:
        fail(str(e))
    train, val = split_off_val(conversations, input)
if not train:
    fail("no train conversations: give more, or a larger EPOCHS")
print(f"{len(train):,} train and {len(val):,} val conversations")
train_text = [content_text(content) for conversation in train for _, content in conversation]
val_text = '\n'.join(content_text(content) for conversation in val for _, content in conversation)

# the tokenizer
try:
    if template_from:  # to fine-tune that model (train.py --init_from=<it>) in its own chat format
        meta = hf_tokenizer_meta(pretrained_dir(template_from, weights=False))
        if not meta['chat_template']:
            fail(f"{template_from} has no chat template")
    elif tokenizer_from:
        meta = read_meta(os.path.join(tokenizer_from, 'meta.pkl'))
        if meta.get('tokenizer', 'char') == 'gpt2' and not meta.get('special_tokens'):
            meta = gpt2_chat_meta()
        elif '<|assistant_start|>' not in meta.get('special_tokens', {}):
            fail(f"{tokenizer_from}/meta.pkl has no chat special tokens: prepare it with --tokenizer=bpe or gpt2")
    elif tokenizer == 'bpe':
        print(f"training a BPE tokenizer of {vocab_size:,} tokens on the train conversations...")
        meta = train_bpe(train_text, vocab_size)
    else:
        meta = gpt2_chat_meta()
    enc = tokenizer_from_meta(meta)
except (OSError, ValueError, KeyError) as e:
    fail(str(e))
print_compression(enc, val_text)


def render(conversations):
    ids, mask = [], []
    for n, conversation in enumerate(conversations):
        try:
            i, m = chat_tokens(enc, conversation)
        except ValueError as e:  # a model's template that refuses a conversation; calculator calls it cannot hold
            fail(f"conversation {n + 1}: {e}")
        ids += i
        # with a model's template, a 2 marks where a conversation starts: train.py starts its windows there
        mask += [2] + m[1:] if template_from else m
    return np.array(ids, dtype=np.dtype(meta['dtype'])), np.array(mask, dtype=np.uint8)


def jsonl(conversations):
    return ''.join(json.dumps({'messages': [{'role': r, 'content': c} for r, c in conversation]}) + '\n'
                   for conversation in conversations).encode('utf-8')


train_ids, train_mask = render(train)
val_ids, val_mask = render(val)
print(f"train has {len(train_ids):,} tokens ({(train_mask == 1).mean():.0%} of them the assistant's)")
print(f"val has {len(val_ids):,} tokens")
os.makedirs(out_dir, exist_ok=True)
write_outputs(out_dir, {'train.bin': train_ids, 'val.bin': val_ids, 'train_mask.bin': train_mask,
                        'val_mask.bin': val_mask, 'train.jsonl': jsonl(train), 'val.jsonl': jsonl(val)}, meta)
print(f"wrote train.bin, val.bin, train_mask.bin, val_mask.bin, train.jsonl, val.jsonl and meta.pkl to {out_dir}")
