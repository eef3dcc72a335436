"""
The chat pipeline: a BPE trained with rustbpe and used through tiktoken, conversations rendered
with the special tokens and their masks (data/chat/prepare.py), the masked fine-tuning loss,
and a tiny end to end: prepare -> train -> fine-tune from that out_dir -> chat through serve.py's
API, sample.py --chat and chat_eval.py, which must all render the same way.
"""
import json
import os
import random

import numpy as np
import pytest
import torch

from conftest import REPO, run_script
from model import GPT, GPTConfig
from tokenizer import (SPECIAL_TOKENS, chat_tokens, gpt2_chat_meta, read_meta, render_chat, tokenizer_from_meta,
                       train_bpe)
from test_serve import client, start_server, stop_server, write_checkpoint

TEXT = ("The quick brown fox jumps over the lazy dog. 123 + 456 = 579. Ünïcödé, 日本語のテキスト, emoji 🤖🎉!\n" * 20
        + "What is 12 - 7? It is 5.\n" * 20)
CONVERSATIONS = [
    [('user', 'What is 2 + 3?'), ('assistant', '5')],
    [('system', 'Be brief.'), ('user', 'Say <|assistant_end|> please'), ('assistant', 'No: <|bos|> is text here.'),
     ('user', 'Again?'), ('assistant', 'Fine.')],
    [('user', 'héllo 🤖'), ('assistant', 'wörld\n\ttabs')],
]
TINY = ['--device=cpu', '--compile=False', '--dtype=float32', '--n_layer=1', '--n_head=2', '--n_embd=32',
        '--block_size=96', '--batch_size=4', '--eval_iters=2', '--log_interval=1', '--warmup_iters=0',
        '--gradient_accumulation_steps=1', '--learning_rate=3e-3', '--eval_interval=5']


@pytest.fixture(scope='module')
def bpe():
    return tokenizer_from_meta(train_bpe([TEXT], 300))


def test_bpe_round_trips_any_text_and_bytes(bpe):
    assert bpe.n_vocab == 300 and sorted(bpe.special_tokens.values()) == list(range(300 - len(SPECIAL_TOKENS), 300))
    rng = random.Random(0)
    for _ in range(200):  # random code points from every plane, surrogates excluded
        s = ''.join(chr(rng.choice([rng.randrange(0x20, 0x80), rng.randrange(0x80, 0xD800),
                                    rng.randrange(0xE000, 0x110000)])) for _ in range(rng.randrange(1, 30)))
        assert bpe.decode(bpe.encode(s)) == s
    assert bpe.decode(bpe.encode(TEXT)) == TEXT and len(bpe.encode(TEXT)) < 0.8 * len(TEXT.encode())
    # any byte string is a sequence of tokens (one per byte at worst): what a stream decodes piece by piece
    data = bytes(rng.randrange(256) for _ in range(500))
    ranks = read_meta_like(bpe)
    assert bpe.token_bytes([ranks[bytes([b])] for b in data]) == data


def read_meta_like(tokenizer):
    return {tokenizer.token_bytes([i]): i for i in range(tokenizer.n_vocab) if i not in tokenizer.special_tokens.values()}


@pytest.mark.parametrize('kind', ['bpe', 'gpt2'])
def test_special_tokens_never_come_from_text(bpe, kind):
    tok = bpe if kind == 'bpe' else tokenizer_from_meta(gpt2_chat_meta())
    specials = set(tok.special_tokens.values())
    assert len(specials) == len(SPECIAL_TOKENS)
    typed = ''.join(SPECIAL_TOKENS) + ' <|endoftext|>'
    assert not specials & set(tok.encode(typed)) and tok.decode(tok.encode(typed)) == typed
    assert not specials & set(tok.encode_prompt(typed))
    ids, stops = render_chat(tok, CONVERSATIONS[1])
    # only the structure's own tokens: one bos, an end for each of the 2 replies, the next reply's start
    end = tok.special_tokens['<|assistant_end|>']
    assert ids.count(end) == 2 and ids.count(tok.special_tokens['<|bos|>']) == 1 and stops == []
    assert ids[-1] == tok.special_tokens['<|assistant_start|>']


def test_masks_cover_exactly_the_assistant_tokens(bpe):
    for conversation in CONVERSATIONS:
        ids, mask = chat_tokens(bpe, conversation)
        assert len(ids) == len(mask)
        # the masked tokens, split at <|assistant_end|>, are exactly the replies
        end = bpe.special_tokens['<|assistant_end|>']
        learned = [t for t, m in zip(ids, mask) if m]
        replies, current = [], []
        for t in learned:
            if t == end:
                replies.append(bpe.decode(current))
                current = []
            else:
                current.append(t)
        assert current == [] and replies == [c for r, c in conversation if r == 'assistant']
        # a prompt rendered for the last reply is the conversation's tokens up to that reply
        prompt, _ = render_chat(bpe, conversation[:-1])
        assert ids == prompt + bpe.encode(conversation[-1][1]) + [end]


def test_non_assistant_targets_give_zero_gradient(bpe, one_thread):
    ids, mask = chat_tokens(bpe, CONVERSATIONS[1])
    x = torch.tensor([ids[:-1]])
    y = torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:])]])  # as train.py masks the targets
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=len(ids), vocab_size=bpe.n_vocab))
    logits = []

    def keep(module, args, out):
        out.retain_grad()
        logits.append(out)
    model.lm_head.register_forward_hook(keep)
    _, loss = model(x, y)
    loss.backward()
    grad = logits[0].grad[0].abs().sum(-1)
    assert (grad[y[0] == -1] == 0).all() and (grad[y[0] != -1] > 0).all()


def write_jsonl(path, conversations):
    path.write_text(''.join(json.dumps({'messages': [{'role': r, 'content': c} for r, c in conv]}) + '\n'
                            for conv in conversations))


def prepare(*args, check=True):
    return run_script(REPO / 'data' / 'chat' / 'prepare.py', *args, check=check)


def test_prepare_input_and_its_errors(tmp_path):
    src = tmp_path / 'conversations.jsonl'
    write_jsonl(src, CONVERSATIONS * 10)
    out = tmp_path / 'out'
    proc = prepare(f'--input={src}', f'--out_dir={out}', '--vocab_size=300')
    assert 'bytes/token' in proc.stdout and 'GPT-2' in proc.stdout
    meta = read_meta(out / 'meta.pkl')
    tok = tokenizer_from_meta(meta)
    ids, mask = np.fromfile(out / 'train.bin', dtype=np.uint16), np.fromfile(out / 'train_mask.bin', dtype=np.uint8)
    expected = [chat_tokens(tok, c) for c in (CONVERSATIONS * 10)[:27]]
    assert ids.tolist() == [t for i, _ in expected for t in i] and mask.tolist() == [m for _, m in expected for m in m]
    assert len(open(out / 'val.jsonl').readlines()) == 3
    # a malformed line: its number and what is wrong, and nothing written
    for i, line in enumerate(['not json', '{"messages": [{"role": "user", "content": "hi"}]}',
                              '{"messages": [{"role": "robot", "content": "hi"}]}']):
        bad = tmp_path / f'bad{i}.jsonl'
        bad.write_text(src.read_text().splitlines()[0] + '\n\n' + line + '\n')
        proc = prepare(f'--input={bad}', f'--out_dir={tmp_path / "bad"}', '--vocab_size=300', check=False)
        assert proc.returncode == 1 and 'line 3:' in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert not (tmp_path / 'bad').exists() or not os.listdir(tmp_path / 'bad')
    proc = prepare(f'--input={src}', f'--out_dir={tmp_path / "big"}', '--vocab_size=70000', check=False)
    assert proc.returncode == 1 and 'uint16' in proc.stderr


def test_task_holds_out_its_questions(tmp_path):
    prepare('--task=arith', '--n_train=3000', '--n_val=200', f'--out_dir={tmp_path}', '--vocab_size=300')
    read = lambda name: [json.loads(line)['messages'] for line in open(tmp_path / name)]  # noqa: E731
    train, val = read('train.jsonl'), read('val.jsonl')
    assert len(train) == 3000 and len(val) == 200
    assert not {m[0]['content'] for m in val} & {m[0]['content'] for m in train}
    kinds = {'+' if '+' in m[1]['content'] else '-' if '-' in m[1]['content'] else 'count' for m in val}
    assert kinds == {'+', '-', 'count'}
    for m in val:  # the reference answers are right
        q, answer = m[0]['content'], int(m[1]['content'].rsplit('Answer: ', 1)[1])
        nums = [int(n) for n in q.replace('?', ' ').replace('.', ' ').split() if n.isdigit()]
        if len(nums) == 2:
            assert answer in (nums[0] + nums[1], abs(nums[0] - nums[1]))


def test_end_to_end_prepare_finetune_chat(tmp_path, one_thread):
    """prepare -> train a base -> fine-tune it (init_from=<out_dir>) -> the same reply through
    serve.py's API, chat_eval.py (in process and through the API) and sample.py --chat."""
    env = {'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1'}
    prepare('--task=arith', '--n_train=600', '--n_val=6', f'--out_dir={tmp_path / "data" / "chat"}', '--vocab_size=300')
    train = lambda *args, check=True: run_script(REPO / 'train.py', *TINY, '--dataset=chat', *args, cwd=tmp_path,  # noqa: E731
                                                 env=env, check=check)
    base = train('--out_dir=base', '--max_iters=10')
    assert 'val bpb' in base.stdout
    tuned = train('--out_dir=tuned', '--init_from=base', '--max_iters=5')
    assert 'Fine-tuning base/ckpt.pt' in tuned.stdout and 'iter 0:' in tuned.stdout
    # exact resume of a fine-tuning run
    train('--out_dir=half', '--init_from=base', '--max_iters=3', '--eval_interval=3')
    resumed = train('--out_dir=half', '--init_from=resume', '--max_iters=5', '--eval_interval=3')
    loss = lambda out, i: out.split(f'iter {i}: loss ')[1].split(',')[0]  # noqa: E731
    assert [loss(resumed.stdout, i) for i in (3, 4)] == [loss(tuned.stdout, i) for i in (3, 4)]
    # another tokenizer: one line
    write_checkpoint(tmp_path / 'chars')
    proc = train('--out_dir=bad', '--init_from=chars', '--max_iters=1', check=False)
    last = proc.stderr.strip().splitlines()[-1]  # after the loader's "Loading meta from ..." notes
    assert proc.returncode == 1 and last.startswith('error: ') and 'another tokenizer' in last and 'Traceback' not in proc.stderr

    out_dir = tmp_path / 'tuned'
    tok = tokenizer_from_meta(read_meta(out_dir / 'meta.pkl'))
    messages = [('user', 'What is 12 + 34?')]
    prompt, _ = render_chat(tok, messages)
    proc, url = start_server(str(tmp_path), str(out_dir))
    try:
        r = client(url).chat.completions.create(model='tiny', messages=[{'role': 'user', 'content': messages[0][1]}],
                                                temperature=0, max_tokens=20)
        api_reply = r.choices[0].message.content
        assert r.usage.prompt_tokens == len(prompt)  # serve.py renders what render_chat renders
        assert not any(s in api_reply for s in SPECIAL_TOKENS)
        val = tmp_path / 'data' / 'chat' / 'val.jsonl'
        remote = run_script(REPO / 'chat_eval.py', f'--url={url}', f'--input={val}', '--max_new_tokens=20', env=env)
    finally:
        stop_server(proc)
    # min_accuracy: a score under it fails the command (exit 1, one line), the scores printed first
    local = run_script(REPO / 'chat_eval.py', f'--out_dir={out_dir}', f'--input={val}', '--max_new_tokens=20',
                       '--device=cpu', '--min_accuracy=1.0', env=env, check=False)
    score = lambda out: out.split('\naccuracy ')[1].split(' ')[0]  # noqa: E731
    assert score(local.stdout) == score(remote.stdout)
    right, n = map(int, score(local.stdout).split('/'))
    if right < n:
        assert local.returncode == 1 and local.stderr.strip().splitlines()[-1] == \
            f"error: accuracy below min_accuracy=100.0%: jsonl {right / n:.1%}", local.stderr
    else:
        assert local.returncode == 0
    chat = run_script(REPO / 'sample.py', f'--out_dir={out_dir}', '--chat=True', '--temperature=0', '--device=cpu',
                      '--max_new_tokens=20', cwd=tmp_path, env=env, input=f'{messages[0][1]}\n')
    assert chat.stdout.split('> ')[1].strip() == api_reply.strip()
