"""
Tokenizers: text <-> token ids, read from the meta.pkl a data/*/prepare.py script writes.

- 'char': one token per character; meta.pkl holds the stoi/itos tables.
- 'gpt2': OpenAI's GPT-2 BPE through tiktoken (which downloads its two files once, or reads
  them from TIKTOKEN_CACHE_DIR), optionally with the chat special tokens appended.
- 'bpe': a byte-level BPE trained on your own text with rustbpe (train_bpe); meta.pkl holds
  its ranks, split pattern and special tokens, so only tiktoken is needed to use it.

load_tokenizer() is the one place that finds and reads a model's meta.pkl; sample.py,
serve.py, bench.py and the prepare scripts all go through it. render_chat() is the one
rendering of a conversation: prepare, sample.py --chat and serve.py all call it.
"""
import json
import os
import pickle
import sys

# GPT-4's split pattern (cl100k_base), except that numbers split into single digits as
# LLaMA's tokenizer does: arithmetic then sees every digit as a token of its own
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|"""
                 r"""\s+(?!\S)|\s+""")
# a chat model's turns; ids come right after the ordinary tokens
SPECIAL_TOKENS = ['<|bos|>', '<|user_start|>', '<|user_end|>', '<|assistant_start|>', '<|assistant_end|>']
MAX_VOCAB = 65536  # token files hold uint16 ids


class Tokenizer:
    """encode(text) -> ids, decode(ids) -> text, token_bytes(ids) -> the exact bytes (for
    streaming, where a BPE token may end inside a UTF-8 character). n_vocab is the number of
    ids it can produce and decode; eot is GPT-2's <|endoftext|> id (None otherwise).
    encode never produces a special token: text that spells one is ordinary text.
    special_tokens: {name: id} of the chat tokens; key: what must match for two tokenizers
    to give the same ids to ordinary text (a fine-tune checks its base model's)."""

    def __init__(self, name, encode, token_bytes, n_vocab, eot=None, encode_prompt=None, special_tokens=None, key=None):
        self.name, self.encode, self.token_bytes, self.n_vocab, self.eot = name, encode, token_bytes, n_vocab, eot
        self._encode_prompt = encode_prompt or encode
        self.special_tokens = dict(special_tokens or {})
        self.key = key or (name,)

    def decode(self, ids):
        return self.token_bytes(ids).decode('utf-8', errors='replace')

    def encode_prompt(self, text):
        """A prompt's ids; an empty prompt becomes <|endoftext|> (GPT-2), <|bos|> or a newline (char-level)."""
        ids = self._encode_prompt(text) if text else []
        if not ids:
            start = self.eot if self.eot is not None else self.special_tokens.get('<|bos|>')
            ids = [start] if start is not None else self.encode('\n')
        return ids

    def byte_lengths(self):
        """How many bytes each id stands for (special tokens: none), for bits per byte."""
        special = set(self.special_tokens.values()) | ({self.eot} if self.eot is not None else set())
        return [0 if i in special else len(self.token_bytes([i])) for i in range(self.n_vocab)]


def char_tokenizer(meta):
    stoi, itos = meta['stoi'], meta['itos']

    def encode(text):
        unknown = sorted(set(text) - set(stoi))
        if unknown:
            raise ValueError(f"characters not in the model's vocabulary: {''.join(unknown)!r}")
        return [stoi[c] for c in text]

    def token_bytes(ids):
        try:
            return ''.join(itos[i] for i in ids).encode('utf-8')
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in the vocabulary of {len(itos)} characters") from None
    return Tokenizer('char', encode, token_bytes, len(itos), key=('char', tuple(itos[i] for i in range(len(itos)))))


def tiktoken_tokenizer(name, enc, special_tokens, key):
    """A Tokenizer over a tiktoken Encoding: ordinary text never becomes a special token."""
    eot = enc.eot_token if '<|endoftext|>' in enc.special_tokens_set else None
    # a prompt may hold <|endoftext|> as nanoGPT's sample.py allows; training text never does
    encode_prompt = ((lambda text: enc.encode(text, allowed_special={'<|endoftext|>'}, disallowed_special=()))
                     if eot is not None else None)
    return Tokenizer(name, enc.encode_ordinary, enc.decode_bytes, enc.n_vocab, eot=eot, encode_prompt=encode_prompt,
                     special_tokens=special_tokens, key=key)


def gpt2_tokenizer(special_tokens=None):
    import tiktoken
    enc = tiktoken.get_encoding('gpt2')
    if special_tokens:  # the chat tokens, appended after GPT-2's 50257
        enc = tiktoken.Encoding('gpt2_chat', pat_str=enc._pat_str, mergeable_ranks=enc._mergeable_ranks,
                                special_tokens={**enc._special_tokens, **special_tokens})
    return tiktoken_tokenizer('gpt2', enc, special_tokens, key=('gpt2',))


def bpe_tokenizer(meta):
    import tiktoken
    ranks = meta['mergeable_ranks']
    enc = tiktoken.Encoding('bpe', pat_str=meta['pattern'], mergeable_ranks=ranks, special_tokens=meta['special_tokens'])
    return tiktoken_tokenizer('bpe', enc, meta['special_tokens'],
                              key=('bpe', meta['pattern'], tuple(sorted(ranks, key=ranks.get))))


def gpt2_chat_meta():
    """meta.pkl for GPT-2's BPE with the chat tokens appended (50257..50261)."""
    return {'tokenizer': 'gpt2', 'vocab_size': 50257 + len(SPECIAL_TOKENS), 'dtype': 'uint16',
            'special_tokens': {name: 50257 + i for i, name in enumerate(SPECIAL_TOKENS)}}


def train_bpe(texts, vocab_size):
    """Train a byte-level BPE with rustbpe on an iterable of strings; its meta.pkl dict. The
    vocabulary holds the 256 bytes, the merges, and the chat special tokens last."""
    import rustbpe
    n_ordinary = vocab_size - len(SPECIAL_TOKENS)
    if not 256 < n_ordinary <= MAX_VOCAB - len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be between {257 + len(SPECIAL_TOKENS)} (256 bytes, a merge and "
                         f"{len(SPECIAL_TOKENS)} special tokens) and {MAX_VOCAB} (token ids are stored as uint16), "
                         f"not {vocab_size}")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), n_ordinary, pattern=SPLIT_PATTERN)
    ranks = dict(trainer.get_mergeable_ranks())  # fewer than asked when the text has no more pairs to merge
    return {'tokenizer': 'bpe', 'vocab_size': len(ranks) + len(SPECIAL_TOKENS), 'pattern': SPLIT_PATTERN,
            'mergeable_ranks': ranks, 'special_tokens': {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)},
            'dtype': 'uint16'}


class _PlainDataUnpickler(pickle.Unpickler):
    """meta.pkl holds only dicts, lists, strings, bytes and numbers. A server may be asked to
    load any directory, and unpickling can run code: refuse anything that names a class."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"meta.pkl refers to {module}.{name}; only plain data is allowed")


def read_meta(path):
    """The dict in a meta.pkl; ValueError (one line) for a file that is not plain data or not whole."""
    try:
        with open(path, 'rb') as f:
            meta = _PlainDataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, OSError) as e:
        raise ValueError(f"{path} is not a valid meta.pkl: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a valid meta.pkl: it holds a {type(meta).__name__}, not a dict")
    return meta


def meta_path_for(out_dir=None, dataset=None):
    """Where a model's tokenizer lives: out_dir/meta.pkl (train.py copies it there), else
    data/<dataset>/meta.pkl of the checkpoint's dataset; None when neither exists (GPT-2)."""
    candidates = [os.path.join(out_dir, 'meta.pkl')] if out_dir else []
    if dataset:
        candidates.append(os.path.join('data', dataset, 'meta.pkl'))
    return next((p for p in candidates if os.path.exists(p)), None)


def tokenizer_from_meta(meta):
    if 'stoi' in meta:
        return char_tokenizer(meta)
    kind = meta.get('tokenizer', 'gpt2')
    if kind == 'gpt2':
        return gpt2_tokenizer(meta.get('special_tokens'))
    if kind == 'bpe':
        return bpe_tokenizer(meta)
    raise ValueError(f"unknown tokenizer '{kind}' in meta.pkl")


def load_tokenizer(out_dir=None, dataset=None):
    """The tokenizer of a model: see meta_path_for; GPT-2's BPE when there is no meta.pkl."""
    path = meta_path_for(out_dir, dataset)
    if path is None:
        return gpt2_tokenizer()
    print(f"Loading meta from {path}...", file=sys.stderr)
    meta = read_meta(path)
    try:
        return tokenizer_from_meta(meta)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a valid meta.pkl: {type(e).__name__}: {e}") from None


def check_vocab(tokenizer, vocab_size):
    """A model and a tokenizer belong together when the model can embed every token id and
    its extra ids are only padding (GPT-2's 50257 is padded to 50304, a multiple of 64): a
    model of 65 characters with GPT-2's BPE would fail on its first prompt."""
    n = tokenizer.n_vocab
    padded = -(-n // 128) * 128
    if not n <= vocab_size <= padded:
        raise ValueError(f"the tokenizer ({tokenizer.name}, {n} tokens) does not match the model's vocabulary of "
                         f"{vocab_size}: is meta.pkl missing from the out_dir, or from another dataset?")


CHAT_ROLES = {'system': 'System', 'user': 'User', 'assistant': 'Assistant'}


def chat_tokens(tokenizer, messages):
    """A whole conversation, [(role, text), ...], in a chat tokenizer's special tokens: its ids
    and a mask, 1 where the token is one the model learns to produce (the assistant's reply and
    its <|assistant_end|>). <|bos|> <|user_start|>...<|user_end|> <|assistant_start|>...<|assistant_end|> ...
    A system message has no tokens of its own: it opens the next user turn (as nanochat does),
    so a model fine-tuned without system messages still reads it as part of the question."""
    special = tokenizer.special_tokens
    ids, mask = [special['<|bos|>']], [0]
    system = []
    for role, content in messages:
        if role == 'system':
            system.append(content)
            continue
        if role == 'user' and system:
            content, system = '\n\n'.join(system + [content]), []
        text = tokenizer.encode(content)
        ids += [special[f'<|{role}_start|>'], *text, special[f'<|{role}_end|>']]
        learn = int(role == 'assistant')
        mask += [0] + [learn] * (len(text) + 1)
    return ids, mask


def render_chat(tokenizer, messages):
    """A conversation, [(role, text), ...], as the prompt ids for the assistant's next reply,
    and the stop strings that end that reply. A chat tokenizer renders chat_tokens and
    <|assistant_start|>; the reply ends at <|assistant_end|> (sample.py's stop_tokens_of).
    A base model has never seen a chat: it gets a plain transcript to continue after
    'Assistant:', and stops where it would write the next turn."""
    if '<|assistant_start|>' in tokenizer.special_tokens:
        ids, _ = chat_tokens(tokenizer, messages)
        return ids + [tokenizer.special_tokens['<|assistant_start|>']], []
    text = '\n'.join(f"{CHAT_ROLES[role]}: {content}" for role, content in messages) + '\nAssistant:'
    return tokenizer.encode_prompt(text), [f"\n{name}:" for name in CHAT_ROLES.values()]


def parse_conversation(line):
    """[(role, content), ...] from one JSONL line; ValueError saying what is wrong."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at column {e.colno})")
    messages = obj.get('messages') if isinstance(obj, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError('expected {"messages": [...]} with at least one message')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get('role') not in CHAT_ROLES or not isinstance(m.get('content'), str):
            raise ValueError(f"messages[{i}] must be {{\"role\": {'|'.join(CHAT_ROLES)}, \"content\": a string}}")
        out.append((m['role'], m['content']))
    turns = [role for role, _ in out if role != 'system']
    # the rendering folds a system message into the next user turn, so one may stand before any user turn
    if turns[::2] != ['user'] * len(turns[::2]) or turns[1::2] != ['assistant'] * len(turns[1::2]) or turns[-1:] != ['assistant'] \
            or out[-1][0] != 'assistant':
        raise ValueError("the turns must alternate user, assistant, ..., and end with the assistant's reply")
    if any(role == 'system' for role, _ in out[max(i for i, (role, _) in enumerate(out) if role == 'user'):]):
        raise ValueError("a system message must come before a user message")
    return out


def read_conversations(path):
    """The conversations of a JSONL file (OpenAI's messages format, each ending with the
    assistant's reply); ValueError naming the line that is wrong. data/chat/prepare.py and
    chat_eval.py both read through here."""
    try:
        with open(path, encoding='utf-8') as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}")
    conversations = []
    for n, line in enumerate(lines, start=1):
        if line.strip():
            try:
                conversations.append(parse_conversation(line))
            except ValueError as e:
                raise ValueError(f"{path} line {n}: {e}")
    return conversations
