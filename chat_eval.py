"""
Score a chat model on held-out conversations (JSONL, one {"messages": [...]} per line, as
data/chat/prepare.py writes val.jsonl): the model answers each conversation but its last
message, greedily, and the reply must equal that last message (the reference) once
whitespace is normalised. Prints the accuracy and a few wrong answers.

$ python chat_eval.py --out_dir=out-chat --input=data/chat/val.jsonl          # batched through the engine
$ python chat_eval.py --url=http://127.0.0.1:8080 --input=data/chat/val.jsonl  # through serve.py's /v1/chat/completions
"""
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from configurator import configure, fail
from sample import generate_text, load_model
from tokenizer import read_conversations, render_chat

# -----------------------------------------------------------------------------
out_dir = 'out-chat'  # the model to score (unless url is set)
init_from = 'resume'  # 'resume' (out_dir), or a transformers directory or hub id to score instead (as sample.py)
input = 'data/chat/val.jsonl'  # the held-out conversations
url = ''  # a running serve.py (http://host:port): score through its /v1/chat/completions instead
limit = 0  # score only the first `limit` conversations (0 = all)
max_new_tokens = 128  # the longest reply
batch_size = 64  # conversations answered together (with url: requests in flight)
show_wrong = 5  # wrong answers to print
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'auto'  # as serve.py: bfloat16 where the CPU or GPU computes it natively, else float32
# -----------------------------------------------------------------------------


def read_eval_set(path):
    """[(messages before the reference, the reference reply)] from a JSONL file."""
    try:
        conversations = read_conversations(path)
    except ValueError as e:
        fail(str(e))
    if not conversations:
        fail(f"{path} has no conversations")
    return [(messages[:-1], messages[-1][1]) for messages in conversations]


def answer_locally(conversations):
    """The model's greedy replies, batch_size conversations at a time through the engine."""
    try:
        model, tokenizer, _ = load_model(init_from, out_dir, device, dtype)
    except (FileNotFoundError, ValueError, OSError) as e:
        fail(str(e))
    replies = []
    for i in range(0, len(conversations), batch_size):
        rendered = [render_chat(tokenizer, messages) for messages, _ in conversations[i:i + batch_size]]
        texts = [''] * len(rendered)
        for row, piece in generate_text(model, tokenizer, [ids for ids, _ in rendered], max_new_tokens,
                                        stop=rendered[0][1], temperature=0.0):
            texts[row] += piece
        replies += texts
    return replies


def answer_remotely(conversations):
    """The replies of a running serve.py at temperature 0, batch_size requests in flight."""
    def ask(messages):
        body = json.dumps({'messages': [{'role': r, 'content': c} for r, c in messages], 'temperature': 0,
                           'max_tokens': max_new_tokens}).encode()
        request = urllib.request.Request(url.rstrip('/') + '/v1/chat/completions', body, {'Content-Type': 'application/json'})
        with urllib.request.urlopen(request, timeout=600) as r:
            return json.loads(r.read())['choices'][0]['message']['content']
    try:
        with ThreadPoolExecutor(batch_size) as pool:
            return list(pool.map(ask, [messages for messages, _ in conversations]))
    except (OSError, ValueError, KeyError) as e:
        fail(f"{url}: {e}")


def normalise(text):
    return ' '.join(text.split())


def main():
    if batch_size < 1:
        fail(f"batch_size must be >= 1, not {batch_size}")
    conversations = read_eval_set(input)[:limit or None]
    t0 = time.time()
    replies = answer_remotely(conversations) if url else answer_locally(conversations)
    dt = time.time() - t0
    wrong = [(c, r) for c, r in zip(conversations, replies) if normalise(r) != normalise(c[1])]
    n = len(conversations)
    for (messages, reference), reply in wrong[:show_wrong]:
        print(f"wrong: {messages[-1][1]!r}\n  expected {reference!r}\n  got      {reply!r}")
    print(f"accuracy {n - len(wrong)}/{n} = {(n - len(wrong)) / n:.1%} on {input} "
          f"({'via ' + url + '/v1/chat/completions' if url else out_dir if init_from == 'resume' else init_from}, "
          f"greedy, {dt:.1f}s)")


if __name__ == '__main__':
    configure(globals())
    main()
