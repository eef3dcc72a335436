"""
Score a model on the benchmarks people quote, the way they are scored elsewhere, or on your own held-out
conversations. One table per task, then the centered mean (accuracy above chance, rescaled so that chance is
0 and a perfect score 1, averaged over the benchmarks: nanochat's ChatCORE); --json_out writes the same.

  --task=   arc_easy, arc_challenge, mmlu, hellaswag   multiple choice (tasks/arc.py, mmlu.py, hellaswag.py)
            gsm8k, humaneval                           answers generated greedily, then checked or run
            jsonl                                      your conversations (--input): the reply must equal the last message
            bpb                                        bits per byte on a dataset split or a text file (tasks/bpb.py)
            core                                       CORE: DCLM's in-context tasks as nanochat scores a base model
                                                       (tasks/core.py; the bundle from --data_dir, else downloaded once)
  --mode=   base: multiple choice as lm-eval-harness scores it, from the log-likelihood of each option as the
                  continuation of its prompt (acc; acc_norm divides by the option's length in characters), with
                  --num_fewshot examples before it; gsm8k and humaneval continue lm-eval-harness's prompts.
            chat: the question is a user's turn; multiple choice is the option letter the model ranks first
                  after <|assistant_start|> (nanochat's categorical scoring); --num_fewshot examples are earlier turns.
            auto: chat when the tokenizer has chat tokens, else base.
Datasets come from the Hugging Face hub (datasets.load_dataset); --data_files reads local files in the same
schema instead (--fewshot_files for the few-shot split). HumanEval programs run in tasks/execution.py's sandbox.

$ python chat_eval.py --out_dir=out-chat --input=data/chat/val.jsonl           # your conversations
$ python chat_eval.py --out_dir=out-chat --task=arc_easy,arc_challenge,mmlu,gsm8k,humaneval
$ python chat_eval.py --init_from=gpt2 --task=hellaswag,arc_easy --mode=base --dtype=float32
$ python chat_eval.py --out_dir=out-chat --task=arc_easy --data_files=arc_easy_test.jsonl
$ python chat_eval.py --out_dir=out --task=core --limit=100 --json_out=core.json   # CORE, 100 rows a task
$ python chat_eval.py --url=http://127.0.0.1:8080 --out_dir=out-chat --task=arc_easy   # through serve.py
"""
import json
import os
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from configurator import configure, fail
from engine import continuation_logprobs
from textgen import generate_text, load_model
from tasks import arc, core, gsm8k, hellaswag, humaneval, mmlu
from tasks.bpb import windowed_loss
from tasks.common import load_rows, multiple_choice, pick_shots, with_shots
from tokenizer import check_vocab, content_text, gpt2_tokenizer, load_tokenizer, read_conversations, render_chat

# -----------------------------------------------------------------------------
task = 'jsonl'  # one or more of the tasks above, comma-separated
init_from = 'resume'  # 'resume' (from out_dir), a gpt2 variant ('gpt2', 'gpt2-xl'), or a local transformers directory
out_dir = 'out-chat'  # the model to score; with url, where its tokenizer is read from (multiple choice needs it)
url = ''  # a running serve.py (http://host:port): score through its API instead
mode = 'auto'  # 'base' | 'chat' | 'auto' (see above)
input = 'data/chat/val.jsonl'  # the jsonl task's conversations
data_files = ''  # local files in the task's hub schema (comma-separated; json/jsonl, parquet, csv, arrow); one task
fewshot_files = ''  # the same for the few-shot examples (with data_files and num_fewshot > 0)
split = ''  # '' = the task's usual split (test; hellaswag: validation; bpb: val)
dataset = ''  # bpb: data/<dataset>/<split>.bin ('' = the model's training dataset), unless data_files names text files
num_fewshot = 0  # examples shown before each question
limit = 0  # score only the first `limit` questions of each task (0 = all)
max_new_tokens = 256  # the longest generated answer
batch_size = 64  # sequences per forward, conversations answered together (with url: requests in flight)
timeout = 10.0  # seconds each HumanEval program may run
show_wrong = 5  # wrong generated answers to print per task
json_out = ''  # also write {task: {metric: value}} here
data_dir = ''  # core: DCLM's eval bundle (core.yaml, eval_data/, eval_meta_data.csv); '' = tasks/core.py's cache, downloaded once
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'auto'  # as serve.py: bfloat16 where the CPU or GPU computes it natively, else float32
tools = True  # answer the model's calculator calls (False: the model must do without; in process only)
min_accuracy = 0.0  # exit 1 when a task's accuracy is below this (make chat-demo: a demo's figure cannot drift unseen)
# -----------------------------------------------------------------------------
if __name__ == '__main__':
    configure(globals())  # before the constants below, so --help and overrides see only the settings above

CHOICE = {'arc_easy': (arc, 'ARC-Easy'), 'arc_challenge': (arc, 'ARC-Challenge'), 'mmlu': (mmlu, 'all'),
          'hellaswag': (hellaswag, None)}
GENERATE = {'gsm8k': (gsm8k, 'main'), 'humaneval': (humaneval, None)}
TASKS = [*CHOICE, *GENERATE, 'jsonl', 'bpb', 'core']
model = tokenizer = info = None  # set by main: in process, the model; with url, only the tokenizer (when needed)
block_size = None  # the model's context (with url: the server's)
lossy = set()  # texts that lost characters a character-level vocabulary lacks
core_tasks = {}  # core: each task's label -> its figures (for json_out)


# -----------------------------------------------------------------------------
# the model, in process or through serve.py: log-likelihoods, letter choices, generated replies

def clean(text):
    """The text a character-level tokenizer can encode: characters it has never seen are dropped, as the exported
    tokenizer drops them in transformers, so that lm-eval-harness scores the same text. Others take any text."""
    if tokenizer is None or tokenizer.name != 'char':
        return text
    try:
        tokenizer.encode(text)
        return text
    except ValueError:
        lossy.add(text)
        known = {tokenizer.decode([i]) for i in range(tokenizer.n_vocab)}
        return ''.join(c for c in text if c in known)


def encode_pair(context, continuation):
    """lm-eval-harness's token split of a context and its continuation: spaces ending the context move to the
    continuation, the whole is encoded, and the continuation is what follows the context's own tokens."""
    n = len(context) - len(context.rstrip())
    context, continuation = clean(context[:len(context) - n]), clean(context[len(context) - n:] + continuation)
    whole, head = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return head, whole[len(head):]


def loglikelihoods(requests):
    """The log probability of each (context ids, continuation ids)'s continuation."""
    if not url:
        return [sum(lp) for lp in continuation_logprobs(model, requests, tokenizer.n_vocab, batch_size)]
    # serve.py scores a prompt's own tokens (echo, logprobs, no new token): the last block_size of them, one
    # context token fewer than in process where a question is longer than that
    answers = post_all('/v1/completions', [dict(prompt=c + x, max_tokens=0, echo=True, logprobs=0) for c, x in requests])
    scored = [a['choices'][0]['logprobs']['token_logprobs'] for a in answers]
    return [sum(lps[len(lps) - len(x):]) if x else 0.0 for lps, (_, x) in zip(scored, requests)]


def letter_picks(conversations, letters):
    """For each conversation, the index of the letter (one token each) the model ranks first as its reply."""
    ids = [[letter_id(letter) for letter in row] for row in letters]
    if not url:
        prompts = [render_chat(tokenizer, chat)[0] for chat in conversations]
        requests = [(p, [i]) for p, row in zip(prompts, ids) for i in row]
        scores = iter(loglikelihoods(requests))
        return [int(np.argmax([next(scores) for _ in row])) for row in ids]
    # greedy, one token, with every letter's logit raised by 100: the reply is the letter ranked first
    bodies = [dict(messages=as_messages(chat), max_tokens=1, logit_bias={str(i): 100 for i in row})
              for chat, row in zip(conversations, ids)]
    replies = [a['choices'][0]['message']['content'] for a in post_all('/v1/chat/completions', bodies)]
    return [row.index(reply) if reply in row else -1 for reply, row in zip(replies, letters)]


def letter_id(letter):
    ids = tokenizer.encode(letter)
    if len(ids) != 1:
        fail(f"the option letter {letter!r} is {len(ids)} tokens in this tokenizer; categorical scoring needs one")
    return ids[0]


def chat_replies(conversations):
    """The model's greedy reply to each conversation ([(role, text)]), batch_size at a time."""
    if url:
        bodies = [dict(messages=as_messages(chat), max_tokens=max_new_tokens) for chat in conversations]
        return [a['choices'][0]['message']['content'] for a in post_all('/v1/chat/completions', bodies)]
    replies = []
    for i in range(0, len(conversations), batch_size):
        rendered = [render_chat(tokenizer, chat) for chat in conversations[i:i + batch_size]]
        replies += generate(rendered)
    return replies


def completions(prompts, stop):
    """A base model's greedy continuation of each text prompt, cut at the first stop string."""
    if url:
        bodies = [dict(prompt=clean(p), max_tokens=max_new_tokens, stop=stop[:4]) for p in prompts]
        texts = [a['choices'][0]['text'] for a in post_all('/v1/completions', bodies)]
    else:
        texts = []
        for i in range(0, len(prompts), batch_size):
            texts += generate([(tokenizer.encode_prompt(clean(p)), stop) for p in prompts[i:i + batch_size]])
    return [min((t.split(s)[0] for s in stop), key=len) for t in texts]  # serve.py takes at most 4 stop strings


def generate(rendered):
    """Greedy replies through the engine to [(prompt ids, stop strings)], decoded together."""
    texts = [''] * len(rendered)
    for row, piece in generate_text(model, tokenizer, [ids for ids, _ in rendered], max_new_tokens,
                                    stop=rendered[0][1], temperature=0.0, tools=tools):
        texts[row] += piece
    return texts


def as_messages(chat):
    return [{'role': role, 'content': content_text(content)} for role, content in chat]  # a reply's calls as text


def post_all(path, bodies):
    """serve.py's JSON answers to the bodies (greedy), batch_size requests in flight; a failure stops the run."""
    def ask(body):
        request = urllib.request.Request(url.rstrip('/') + path, json.dumps(dict(body, temperature=0)).encode(),
                                         {'Content-Type': 'application/json'})
        with urllib.request.urlopen(request, timeout=600) as r:
            return json.loads(r.read())
    try:
        with ThreadPoolExecutor(batch_size) as pool:
            return list(pool.map(ask, bodies))
    except urllib.error.HTTPError as e:
        fail(f"{url}{path}: {e.code} {e.read().decode(errors='replace')[:300]}")
    except (OSError, ValueError, KeyError) as e:
        fail(f"{url}{path}: {e}")


# -----------------------------------------------------------------------------
# the tasks

def rows_of(name, module, config, which, files):
    """The examples of one split: from the hub, or from local files in its schema."""
    try:
        rows = load_rows(module.HUB, config, which, files)
    except ValueError as e:
        fail(str(e))
    try:
        return [module.example(row) for row in rows]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        fail(f"{files or module.HUB}: a row is not in the {name} schema ({type(e).__name__}: {e})")


def examples_and_shots(name):
    """A benchmark's questions (the first `limit`) and the few-shot examples of each."""
    module, config = CHOICE.get(name) or GENERATE[name]
    examples = rows_of(name, module, config, split or module.SPLIT, data_files)[:limit or None]
    if not examples:
        fail(f"{name}: no questions in {data_files or module.HUB}")
    pool = []
    if num_fewshot:
        if module.FEWSHOT_SPLIT is None:
            fail(f"{name} has no few-shot split: use num_fewshot=0")
        if data_files and not fewshot_files:
            fail("with data_files and num_fewshot > 0, give the few-shot examples as fewshot_files")
        pool = rows_of(name, module, config, module.FEWSHOT_SPLIT, fewshot_files)
    for ex in examples + pool:  # a few-shot example of multiple choice is answered with the gold option
        if 'choices' in ex:
            ex['shot_answer'] = ex['choices'][ex['gold']]
    try:
        return examples, pick_shots(examples, pool, num_fewshot, module.SAMPLER)
    except ValueError as e:
        fail(f"{name}: {e}")


def run_choice(name, examples, shots):
    chance = float(np.mean([1 / len(ex['choices']) for ex in examples]))
    if mode == 'chat':
        conversations, letters = [], []
        for ex, exs in zip(examples, shots):
            turns = [t for s in exs for t in (('user', clean(multiple_choice(s['question'], s['letters'], s['options']))),
                                              ('assistant', s['letters'][s['gold']]))]
            conversations.append(turns + [('user', clean(multiple_choice(ex['question'], ex['letters'], ex['options'])))])
            letters.append(list(ex['letters']))
        picks = letter_picks(conversations, letters)
        return dict(acc=float(np.mean([p == ex['gold'] for p, ex in zip(picks, examples)]))), chance, len(examples)
    requests = []
    for ex, exs in zip(examples, shots):
        context = with_shots(ex['description'], exs, ex['query'])
        requests += [encode_pair(context, ' ' + choice) for choice in ex['choices']]
    scores = loglikelihoods(requests)
    acc, acc_norm, k = [], [], 0
    for ex in examples:  # np.argmax takes the first of equal scores, as lm-eval-harness does
        ll = np.array(scores[k:k + len(ex['choices'])])
        k += len(ex['choices'])
        acc.append(int(np.argmax(ll)) == ex['gold'])
        acc_norm.append(int(np.argmax(ll / np.array([len(c) for c in ex['choices']]))) == ex['gold'])
    return dict(acc=float(np.mean(acc)), acc_norm=float(np.mean(acc_norm))), chance, len(examples)


def run_generate(name, examples, shots):
    module = GENERATE[name][0]
    chat = mode == 'chat'
    if chat:
        replies = chat_replies([[t for s in exs for t in (('user', clean(s['question'])), ('assistant', clean(s['shot_answer'])))]
                                + [('user', clean(ex['question']))] for ex, exs in zip(examples, shots)])
    else:
        replies = completions([with_shots('', exs, ex['query']) for ex, exs in zip(examples, shots)], module.STOP)
    if name == 'humaneval':  # each program waits on its own subprocess: two at a time keep both cores busy
        with ThreadPoolExecutor(2) as pool:
            ok = list(pool.map(lambda a: module.correct(*a, chat, timeout), zip(examples, replies)))
    else:
        ok = [module.correct(ex, reply) for ex, reply in zip(examples, replies)]
    for ex, reply in [(ex, r) for ex, r, good in zip(examples, replies, ok) if not good][:show_wrong]:
        print(f"{name} wrong: {ex['question'][:80]!r}\n  got {reply[:200]!r}")
    return dict(acc=float(np.mean(ok))), 0.0, len(examples)


def run_jsonl():
    """Today's check: the greedy reply to each conversation but its last message must equal that message."""
    try:
        conversations = read_conversations(input)
    except ValueError as e:
        fail(str(e))
    if not conversations:
        fail(f"{input} has no conversations")
    # a reference with calculator calls is compared as text, the calls and their outputs in it (as a reply shows them)
    conversations = [(messages[:-1], content_text(messages[-1][1])) for messages in conversations][:limit or None]
    replies = chat_replies([messages for messages, _ in conversations])
    normalise = lambda text: ' '.join(text.split())  # noqa: E731
    wrong = [(c, r) for c, r in zip(conversations, replies) if normalise(r) != normalise(c[1])]
    n = len(conversations)
    for (messages, reference), reply in wrong[:show_wrong]:
        print(f"wrong: {content_text(messages[-1][1])!r}\n  expected {reference!r}\n  got      {reply!r}")
    print(f"accuracy {n - len(wrong)}/{n} = {(n - len(wrong)) / n:.1%} on {input} "
          f"({'via ' + url + '/v1/chat/completions' if url else out_dir}, greedy)")
    return dict(acc=(n - len(wrong)) / n), None, n


def run_bpb():
    """Bits per byte of the model's tokenizer's tokens, over consecutive windows of its context."""
    mask = None
    if data_files:
        try:
            text = ''.join(open(path, encoding='utf-8').read() for path in data_files.split(',') if path)
            data = np.array(tokenizer.encode(text), dtype=np.int64)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            fail(f"bpb: {e}")
        where = data_files
    else:
        name = dataset or (info.get('config') or {}).get('dataset')
        which = split or 'val'
        where = os.path.join('data', name or '?', f'{which}.bin')
        if not name or not os.path.exists(where):
            fail(f"bpb: no {where}: name a prepared dataset (dataset=...) or text files (data_files=...)")
        try:
            theirs = load_tokenizer(None, name)
        except ValueError as e:
            fail(str(e))
        if theirs.key != tokenizer.key:
            fail(f"bpb: data/{name} was tokenized with another tokenizer ({theirs.name}) than the model's ({tokenizer.name})")
        data = np.memmap(where, dtype=np.uint32 if tokenizer.n_vocab > 65536 else np.uint16, mode='r')
        if os.path.exists(where.replace('.bin', '_mask.bin')):  # a chat dataset: only the assistant's tokens count
            mask = np.memmap(where.replace('.bin', '_mask.bin'), dtype=np.uint8, mode='r')
    windows = min(batch_size, max(1, (64 << 20) // (block_size * model.config.vocab_size)))  # ~256 MB of logits
    try:
        loss, bits = windowed_loss(model, data, block_size, windows, device, mask=mask,
                                   byte_lengths=tokenizer.byte_lengths())
    except ValueError as e:
        fail(f"bpb: {where}: {e}")
    print(f"bpb on {where}: {len(data):,} tokens, loss {loss:.4f}")
    return dict(bpb=bits, loss=loss), None, len(data)


def core_bundle():
    """CORE's tasks from data_dir, or from the cache (fetched the first time)."""
    where = data_dir or core.DEFAULT_DIR
    if not data_dir and not os.path.exists(os.path.join(where, 'core.yaml')):
        try:
            core.download(where)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            fail(f"core: cannot download the eval bundle ({core.BUNDLE_URL}): {e}; give a local copy as data_dir=")
    try:
        tasks = core.load_bundle(where)
    except ValueError as e:
        fail(f"core: {e}")
    for task in tasks:  # before the model is loaded
        if len(task['rows'][:limit or None]) <= task['shots']:
            fail(f"core: {task['label']}: {len(task['rows'][:limit or None])} rows cannot give each {task['shots']} "
                 f"few-shot examples of others (raise limit)")
    return tasks


def run_core(tasks):
    """Every task of the bundle scored as a base model (whatever the mode), then the mean centered accuracy."""
    if tokenizer.chat_template is not None:
        fail("core scores a model of this repo's tokenizers (char, gpt2, bpe), not a transformers template's")
    bos = tokenizer.special_tokens.get('<|bos|>', tokenizer.eot)  # GPT-2's <|endoftext|> begins its texts too
    encode = lambda text: tokenizer.encode(clean(text))  # noqa: E731
    print(f"{'task':<34}{'kind':<19}{'shots':>6}{'n':>7}{'acc':>8}{'chance':>8}{'centered':>10}{'time':>8}")
    for task in tasks:
        t0 = time.time()
        try:
            acc, right = core.evaluate(model, task, encode, bos, tokenizer.n_vocab, limit)
        except ValueError as e:
            fail(f"core: {e}")
        c = core.centered(acc, task['baseline'])
        core_tasks[task['label']] = dict(acc=acc, centered=c, n=len(right), shots=task['shots'], kind=task['kind'],
                                         baseline=task['baseline'])
        print(f"{task['label']:<34}{task['kind']:<19}{task['shots']:>6}{len(right):>7}{acc:>8.4f}{task['baseline']:>8.4f}"
              f"{c:>10.4f}{time.time() - t0:>7.1f}s")
    value = float(np.mean([t['centered'] for t in core_tasks.values()]))
    print(f"{'CORE':<34}{'':<19}{'':>6}{sum(t['n'] for t in core_tasks.values()):>7}{'':>8}{'':>8}{value:>10.4f}")
    return dict(core=value), None, sum(t['n'] for t in core_tasks.values())


# -----------------------------------------------------------------------------

def load():
    """The model and its tokenizer in process; with url, the tokenizer alone (for multiple choice and the mode),
    checked against the server's."""
    global model, tokenizer, info, block_size, mode
    names = task.split(',')
    if not url:
        try:
            model, tokenizer, info = load_model(init_from, out_dir, device, dtype)
        except (FileNotFoundError, ValueError, OSError) as e:
            fail(str(e))
        block_size = model.config.block_size
    elif any(n in CHOICE for n in names) or (mode == 'auto' and any(n in GENERATE for n in names)):
        try:
            with urllib.request.urlopen(url.rstrip('/') + '/api/model', timeout=60) as r:
                served = json.loads(r.read())
            tokenizer = (load_tokenizer(out_dir) if init_from == 'resume' else
                         gpt2_tokenizer() if init_from.startswith('gpt2') else load_tokenizer(init_from))
            if tokenizer.name != served['tokenizer']:
                raise ValueError(f"the server's model has a {served['tokenizer']} tokenizer, {out_dir}'s is {tokenizer.name}")
            check_vocab(tokenizer, served['vocab_size'])
        except (OSError, ValueError, KeyError) as e:
            fail(f"with url, multiple choice needs the served model's tokenizer (out_dir or init_from as serve.py "
                 f"was started): {e}")
        block_size = served['block_size']
    if mode == 'auto':
        mode = ('chat' if tokenizer is None or '<|assistant_start|>' in tokenizer.special_tokens
                or tokenizer.chat_template is not None else 'base')  # a Llama model's own template


def main():
    names = [n for n in task.split(',') if n]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        fail(f"task must be one or more of {', '.join(TASKS)} (comma-separated), not {task!r}")
    if mode not in ('auto', 'base', 'chat'):
        fail(f"mode must be 'auto', 'base' or 'chat', not {mode!r}")
    if (data_files or fewshot_files) and len(names) > 1:
        fail("data_files and fewshot_files are one task's: name one task")
    if url and ('bpb' in names or 'core' in names):
        fail("bpb and core run in process: drop url")
    if url and not tools:
        fail("tools=False works in process only: serve.py always answers a model's calculator calls")
    if not 0 <= min_accuracy <= 1:
        fail(f"min_accuracy must be between 0 and 1, not {min_accuracy}")
    for setting, value, low in (('batch_size', batch_size, 1), ('num_fewshot', num_fewshot, 0), ('limit', limit, 0),
                                ('max_new_tokens', max_new_tokens, 1)):
        if not isinstance(value, int) or value < low:
            fail(f"{setting} must be an integer >= {low}, not {value!r}")
    questions = {name: examples_and_shots(name) for name in names if name in CHOICE or name in GENERATE}  # before the model
    bundle = core_bundle() if 'core' in names else None
    load()
    results, rows = {}, []
    for name in names:
        t0 = time.time()
        if name in questions:
            metrics, chance, n = (run_choice if name in CHOICE else run_generate)(name, *questions[name])
        else:
            metrics, chance, n = run_jsonl() if name == 'jsonl' else run_core(bundle) if name == 'core' else run_bpb()
        results[name] = dict(metrics, n=n, **({'tasks': core_tasks} if name == 'core' else {}))
        if chance is not None and name != 'jsonl':  # the benchmarks enter the centered mean
            results[name]['centered'] = (metrics['acc'] - chance) / (1 - chance)
        rows.append((name, n, metrics, chance, time.time() - t0))
    how = f"{'via ' + url if url else init_from if init_from != 'resume' else out_dir}, {mode}, {num_fewshot}-shot"
    print(f"\n{how}\n{'task':<15}{'n':>7}  {'metric':<9}{'value':>8}{'chance':>8}{'centered':>10}{'time':>9}")
    for name, n, metrics, chance, dt in rows:
        for i, (metric, value) in enumerate(metrics.items()):
            centered = results[name].get('centered') if metric == 'acc' else None
            print(f"{name if i == 0 else '':<15}{n if i == 0 else '':>7}  {metric:<9}{fmt(value):>8}"
                  f"{fmt(chance if metric == 'acc' else None):>8}{fmt(centered):>10}{f'{dt:.1f}s' if i == 0 else '':>9}")
    centered = [r['centered'] for r in results.values() if 'centered' in r]
    if centered:
        results['centered_mean'] = dict(value=float(np.mean(centered)), tasks=len(centered))
        print(f"centered mean over {len(centered)} task{'s' * (len(centered) > 1)}: {np.mean(centered):.4f} "
              f"(0 = chance, 1 = every answer right)")
    if lossy:
        print(f"note: {len(lossy)} texts lost characters this character-level vocabulary lacks (dropped, as "
              f"transformers' export of it drops them)")
    if json_out:
        tmp = f"{json_out}.tmp-{os.getpid()}"
        with open(tmp, 'w') as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, json_out)
    below = [f"{name} {r['acc']:.1%}" for name, r in results.items() if r.get('acc', 1.0) < min_accuracy]
    if below:
        fail(f"accuracy below min_accuracy={min_accuracy:.1%}: {', '.join(below)}")


def fmt(value):
    return '-' if value is None else f"{value:.4f}"


if __name__ == '__main__':
    main()
