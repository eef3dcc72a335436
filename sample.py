"""
Sample from a trained model (an out_dir checkpoint) or from OpenAI's GPT-2.

$ python sample.py --out_dir=out-shakespeare-char
$ python sample.py --init_from=gpt2 --start="What is the answer to life?" --stream=True
$ python sample.py --out_dir=out-shakespeare-char --interactive=True   # a prompt, a continuation, repeat
$ python sample.py --out_dir=out-chat --chat=True   # a multi-turn chat (a model fine-tuned on data/chat)
$ python sample.py --out_dir=out-shakespeare-char --num_beams=4   # beam search: the best of 4 beams
$ python sample.py --out_dir=out-shakespeare-char --draft=ngram --temperature=0   # speculative decoding

The model and its tokenizer come from textgen.load_model, the text from textgen.generate_text: the
one decode engine (engine.py) under the text layer every script shares.
"""
import sys
import time

import torch

from common import set_threads
from configurator import configure, fail
from engine import Row
from textgen import generate_text, load_draft, load_model
from tokenizer import render_chat, reply_content

# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (from out_dir), a gpt2 variant ('gpt2', 'gpt2-xl'), a local transformers directory, a hub id
out_dir = 'out'  # ignored unless init_from is 'resume'
start = "\n"  # the prompt; "FILE:prompt.txt" reads it from a file
num_samples = 10  # continuations of the prompt, generated together as one batch
max_new_tokens = 500  # tokens generated in each sample
temperature = 0.8  # 1.0 = no change, < 1.0 = less random, > 1.0 = more random, 0 = greedy
top_k = 200  # keep only the top_k most likely tokens (0 = no limit)
top_p = 1.0  # nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1.0 = off)
repetition_penalty = 1.0  # > 1.0 discourages tokens already in the text
stop = ''  # stop a sample when this text appears (the sample ends just before it); '' = never
seed = 1337  # sample i draws from its own random stream, seeded with seed + i
draft = ''  # speculative decoding: 'ngram' (prompt lookup: pays where the text repeats its prompt), a smaller
# model with the same tokenizer (its out_dir, or a gpt2 name) that proposes, or '' off
draft_tokens = 4  # tokens the draft proposes per step, all checked in one forward
num_beams = 1  # > 1: beam search as transformers' generate(num_beams=...) does; prints its best beam (one sample)
stream = False  # print tokens as they are generated (one sample at a time)
interactive = False  # a REPL: read a prompt, stream one continuation, repeat (Ctrl-D or Ctrl-C exits)
chat = False  # a multi-turn chat: read a message, stream the reply, repeat (rendered as serve.py's chat API does)
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda', 'cuda:0', 'mps'
dtype = 'auto'  # bfloat16 where the GPU or CPU computes it natively, else float32 (float16 on older GPUs); or name one
quantize = ''  # 'int8': int8 weights with a scale per row in every Linear (on a CPU: faster at batch 1, slower at 8)
tools = True  # a chat model with the calculator tokens gets its calculator calls answered (calculator.py)
threads = 0  # CPU threads the model computes on; 0: one fewer than torch's default (the cores), see common.set_threads
# -----------------------------------------------------------------------------


def main():
    if threads < 0:
        fail(f"threads must be >= 0, not {threads}")
    set_threads(threads)
    try:
        model, tokenizer, info = load_model(init_from, out_dir, device, dtype, quantize)
    except (FileNotFoundError, ValueError, OSError) as e:
        fail(str(e))
    prompt = start
    if prompt.startswith('FILE:'):
        try:
            with open(prompt[5:], 'r', encoding='utf-8') as f:
                prompt = f.read()
        except OSError as e:
            fail(f"cannot read prompt file: {e}")
        except UnicodeDecodeError as e:
            fail(f"the prompt file {prompt[5:]} is not UTF-8 text (bad byte at offset {e.start})")
    if num_samples < 1 or max_new_tokens < 1 or num_beams < 1:
        fail(f"num_samples, max_new_tokens and num_beams must be >= 1, not {num_samples}, {max_new_tokens} and {num_beams}")
    draft_model = None
    if draft not in ('', 'ngram'):
        try:
            draft_model = load_draft(draft, tokenizer, device, dtype, quantize)
        except (FileNotFoundError, ValueError, OSError) as e:
            fail(f"draft: {e}")
    kind = 'model' if draft_model else draft  # the engine's name for a draft model's rows
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                   stop=stop, num_beams=num_beams, tools=tools, draft=kind, draft_tokens=draft_tokens,
                   draft_model=draft_model)
    samples = num_samples if num_beams == 1 else 1  # beam search is deterministic: its one best beam
    try:  # the settings and the prompt, checked before any work
        Row(tokenizer.encode_prompt(prompt), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=seed, draft=kind, draft_tokens=draft_tokens)
        if draft and num_beams > 1:
            raise ValueError("draft does not apply to a beam search (num_beams): leave one out")
    except ValueError as e:
        fail(str(e))

    if interactive or chat:
        # a terminal session with the model: read a prompt (a message), stream its continuation (the reply), repeat
        n, messages = 0, []
        while True:
            try:
                line = input('> ')
            except (EOFError, KeyboardInterrupt):
                print()
                return
            reply = ''
            try:
                prompt, stops = (line, [])
                if chat:
                    prompt, stops = render_chat(tokenizer, messages + [('user', line)])
                for _, piece in generate_text(model, tokenizer, [prompt], max_new_tokens, seed=seed + n,
                                              **dict(options, stop=[stop, *stops])):
                    piece = piece if reply or not chat else piece.lstrip()  # a transcript's 'Assistant:' leaves a space
                    reply += piece
                    print(piece, end='', flush=True)
            except ValueError as e:  # e.g. a character the model has never seen
                print(f"error: {e}", flush=True)
                continue
            except KeyboardInterrupt:
                print()
                return
            print(flush=True)
            messages += [('user', line), ('assistant', reply_content(reply))]
            n += 1

    if stream:
        # one sample at a time, printed as it decodes
        for i in range(samples):
            for _, piece in generate_text(model, tokenizer, [prompt], max_new_tokens, seed=seed + i, **options):
                print(piece, end='', flush=True)
            print('\n---------------', flush=True)
        return
    t0 = time.time()
    texts = [''] * samples
    for row, piece in generate_text(model, tokenizer, [prompt] * samples, max_new_tokens, seed=seed,
                                    progress=True, **options):
        texts[row] += piece
    dt = time.time() - t0
    for text in texts:
        print(prompt + text)
        print('---------------')
    print(f"{samples} x {max_new_tokens} tokens in {dt:.2f}s" + (f" ({num_beams} beams)" if num_beams > 1 else ''),
          file=sys.stderr)


if __name__ == '__main__':
    configure(globals())
    main()
