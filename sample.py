"""
Sample from a trained model (an out_dir checkpoint) or from OpenAI's GPT-2.

$ python sample.py --out_dir=out-shakespeare-char
$ python sample.py --init_from=gpt2 --start="What is the answer to life?" --stream=True
$ python sample.py --out_dir=out-shakespeare-char --interactive=True   # a prompt, a continuation, repeat

The loading and text-decoding functions here are what bench.py and serve.py import.
"""
import codecs
import os
import pickle
import sys
import time

import torch

from configurator import configure, fail
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (from out_dir), a gpt2 variant ('gpt2', 'gpt2-xl'), or a local transformers directory
out_dir = 'out'  # ignored unless init_from is 'resume'
start = "\n"  # the prompt; "FILE:prompt.txt" reads it from a file
num_samples = 10  # continuations of the prompt, generated together as one batch
max_new_tokens = 500  # tokens generated in each sample
temperature = 0.8  # 1.0 = no change, < 1.0 = less random, > 1.0 = more random, 0 = greedy
top_k = 200  # keep only the top_k most likely tokens (0 = no limit)
top_p = 1.0  # nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1.0 = off)
repetition_penalty = 1.0  # > 1.0 discourages tokens already in the text
stop = ''  # stop a sample when this text appears (the sample ends just before it); '' = never
seed = 1337
stream = False  # print tokens as they are generated (one sample at a time)
interactive = False  # a REPL: read a prompt, stream one continuation, repeat (Ctrl-D or Ctrl-C exits)
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda', 'cuda:0', 'mps'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'  # or 'float16'
compile = False  # torch.compile the model (pays off only for long generations on a GPU)
# -----------------------------------------------------------------------------


def load_checkpoint_model(out_dir, device):
    """A GPT from out_dir/ckpt.pt (ours or nanoGPT's) and the checkpoint without its weights."""
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.exists(ckpt_path):
        raise FileNotFoundError(f"no checkpoint at {ckpt_path}: train one with train.py, or set --out_dir")
    checkpoint = torch.load(ckpt_path, map_location=device, weights_only=False)
    model_args = dict(checkpoint['model_args'])
    model_args.setdefault('gelu_approximate', checkpoint.get('gelu_approximate', 'none'))
    model = GPT(GPTConfig(**model_args))
    # nanoGPT's checkpoints of compiled models carry this prefix on every key
    state_dict = {k.removeprefix('_orig_mod.'): v for k, v in checkpoint['model'].items()}
    model.load_state_dict(state_dict)
    info = {k: v for k, v in checkpoint.items() if k not in ('model', 'optimizer', 'scaler')}
    return model, info


def load_model(init_from='resume', out_dir='out', device='cpu', dtype='float32', compile=False):
    """The model ready for inference on `device` in `dtype`, and a dict describing where it came from."""
    if init_from == 'resume':
        model, info = load_checkpoint_model(out_dir, device)
        info['source'] = os.path.join(out_dir, 'ckpt.pt')
    elif init_from.startswith('gpt2') or os.path.isdir(init_from):
        model = GPT.from_pretrained(init_from, dict(dropout=0.0))
        info = {'source': init_from, 'model_args': {k: getattr(model.config, k) for k in GPTConfig.__dataclass_fields__}}
    else:
        raise ValueError(f"init_from must be 'resume', a gpt2 name or a local transformers directory, not '{init_from}'")
    model.eval()
    model.to(device)
    if dtype != 'float32':
        # inference only: cast the weights once instead of autocasting every op
        model.to({'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype])
    if compile:
        model.compile(dynamic=True)
    return model, info


class Tokenizer:
    """encode(text) -> ids, decode(ids) -> text, and token_bytes(ids) for exact streaming."""

    def __init__(self, name, encode, token_bytes, eot=None):
        self.name, self.encode, self.token_bytes, self.eot = name, encode, token_bytes, eot

    def decode(self, ids):
        return self.token_bytes(ids).decode('utf-8', errors='replace')

    def encode_prompt(self, text):
        """A prompt's ids; an empty prompt becomes <|endoftext|> (GPT-2) or a newline (char-level)."""
        ids = self.encode(text) if text else []
        if not ids:
            ids = [self.eot] if self.eot is not None else self.encode('\n')
        return ids


def char_tokenizer(meta):
    stoi, itos = meta['stoi'], meta['itos']

    def encode(text):
        unknown = sorted(set(text) - set(stoi))
        if unknown:
            raise ValueError(f"characters not in the model's vocabulary: {''.join(unknown)!r}")
        return [stoi[c] for c in text]
    return Tokenizer('char', encode, lambda ids: ''.join(itos[i] for i in ids).encode('utf-8'))


def gpt2_tokenizer():
    import tiktoken  # reads its BPE files from TIKTOKEN_CACHE_DIR when offline
    enc = tiktoken.get_encoding('gpt2')
    return Tokenizer('gpt2', lambda text: enc.encode(text, allowed_special={'<|endoftext|>'}),
                     enc.decode_bytes, eot=enc.eot_token)


def load_tokenizer(out_dir=None, info=None):
    """meta.pkl in out_dir, else data/<dataset>/meta.pkl of the checkpoint's dataset, else GPT-2 BPE."""
    candidates = []
    if out_dir:
        candidates.append(os.path.join(out_dir, 'meta.pkl'))
    dataset = ((info or {}).get('config') or {}).get('dataset')
    if dataset:
        candidates.append(os.path.join('data', dataset, 'meta.pkl'))
    for path in candidates:
        if os.path.exists(path):
            with open(path, 'rb') as f:
                meta = pickle.load(f)
            if 'stoi' in meta:
                print(f"Loading meta from {path}...", file=sys.stderr)
                return char_tokenizer(meta)
            break  # a BPE dataset's meta: GPT-2 below
    return gpt2_tokenizer()


class TextStream:
    """Turns one sample's tokens into text as they arrive. A BPE token can end in the middle
    of a UTF-8 character, so bytes are decoded incrementally and a partial character waits
    for the next token. Text that could be the start of a stop sequence is held back until it
    is clear; when a stop sequence (or <|endoftext|>) appears, the text ends just before it."""

    def __init__(self, tokenizer, stop=()):
        self.tokenizer = tokenizer
        self.stop = [s for s in ([stop] if isinstance(stop, str) else stop) if s]
        self.decoder = codecs.getincrementaldecoder('utf-8')(errors='replace')
        self.pending = ''  # decoded, not yet released
        self.stopped = False  # a stop sequence or <|endoftext|> was reached

    def add(self, token):
        """Feed one token id; return the text that is now safe to show ('' if none)."""
        if self.stopped:
            return ''
        if token == self.tokenizer.eot:
            self.stopped = True
            return self._release(len(self.pending))
        self.pending += self.decoder.decode(self.tokenizer.token_bytes([token]))
        cut = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._release(cut)
        # hold back the longest tail of pending that begins some stop sequence
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        return self._release(len(self.pending) - hold)

    def finish(self):
        """The text still held back at the end of generation."""
        if self.stopped:
            return ''
        self.pending += self.decoder.decode(b'', final=True)
        return self._release(len(self.pending))

    def _release(self, n):
        out, self.pending = self.pending[:n], ('' if self.stopped else self.pending[n:])
        return out


def generate_text(model, tokenizer, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                  repetition_penalty=1.0, stop=(), seed=None, progress=False):
    """Continue each prompt (a list of strings, one batch row each). Yields (row, text) pieces
    as they decode; a row ends at a stop sequence or after max_new_tokens tokens."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    streams = [TextStream(tokenizer, stop) for _ in prompts]
    steps = model.generate_tokens([tokenizer.encode_prompt(p) for p in prompts], max_new_tokens,
                                  temperature=temperature, top_k=top_k or None, top_p=top_p,
                                  repetition_penalty=repetition_penalty, generator=generator)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, total=max_new_tokens, unit='tok', desc='sampling', leave=False, file=sys.stderr)
    for tokens in steps:
        for row, token in enumerate(tokens.tolist()):
            piece = streams[row].add(token)
            if piece:
                yield row, piece
        if all(s.stopped for s in streams):
            break  # every row hit a stop sequence: no need to run the rest
    for row, s in enumerate(streams):
        piece = s.finish()
        if piece:
            yield row, piece


def main():
    settings = dict(num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p)
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or num_samples < 1 or max_new_tokens < 0:
        fail(f"invalid sampling settings: {settings} (temperature >= 0, 0 < top_p <= 1, top_k >= 0, num_samples >= 1)")
    if repetition_penalty <= 0:
        fail("repetition_penalty must be > 0")
    if dtype not in ('float32', 'bfloat16', 'float16'):
        fail(f"dtype must be float32, bfloat16 or float16, not '{dtype}'")
    torch.manual_seed(seed)
    try:
        model, info = load_model(init_from, out_dir, device, dtype, compile)
    except (FileNotFoundError, ValueError, OSError) as e:
        fail(str(e))
    tokenizer = load_tokenizer(out_dir if init_from == 'resume' else None, info)
    prompt = start
    if prompt.startswith('FILE:'):
        try:
            with open(prompt[5:], 'r', encoding='utf-8') as f:
                prompt = f.read()
        except OSError as e:
            fail(f"cannot read prompt file: {e}")
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                   stop=stop)

    if interactive:
        # a terminal chat with the model: read a prompt, stream its continuation, repeat
        n = 0
        while True:
            try:
                line = input('> ')
            except (EOFError, KeyboardInterrupt):
                print()
                return
            try:
                for _, piece in generate_text(model, tokenizer, [line], max_new_tokens, seed=seed + n, **options):
                    print(piece, end='', flush=True)
            except ValueError as e:  # e.g. a character the model has never seen
                print(f"error: {e}", flush=True)
            except KeyboardInterrupt:
                print()
                return
            print(flush=True)
            n += 1

    try:
        tokenizer.encode_prompt(prompt)
    except ValueError as e:
        fail(str(e))
    if stream:
        # one sample at a time, printed as it decodes
        for i in range(num_samples):
            for _, piece in generate_text(model, tokenizer, [prompt], max_new_tokens, seed=seed + i, **options):
                print(piece, end='', flush=True)
            print('\n---------------', flush=True)
        return
    t0 = time.time()
    texts = [''] * num_samples
    for row, piece in generate_text(model, tokenizer, [prompt] * num_samples, max_new_tokens, seed=seed,
                                    progress=True, **options):
        texts[row] += piece
    dt = time.time() - t0
    for text in texts:
        print(prompt + text)
        print('---------------')
    print(f"{num_samples} x {max_new_tokens} tokens in {dt:.2f}s", file=sys.stderr)


if __name__ == '__main__':
    configure(globals())
    main()
