"""
Tokenizers: text <-> token ids, read from the meta.pkl a data/*/prepare.py script writes.

- 'char': one token per character; meta.pkl holds the stoi/itos tables.
- 'gpt2': OpenAI's GPT-2 BPE through tiktoken (which downloads its two files once, or reads
  them from TIKTOKEN_CACHE_DIR).

load_tokenizer() is the one place that finds and reads a model's meta.pkl; sample.py,
serve.py, bench.py and the prepare scripts all go through it.
"""
import os
import pickle
import sys


class Tokenizer:
    """encode(text) -> ids, decode(ids) -> text, token_bytes(ids) -> the exact bytes (for
    streaming, where a BPE token may end inside a UTF-8 character). n_vocab is the number of
    ids it can produce and decode; eot is GPT-2's <|endoftext|> id (None for char-level)."""

    def __init__(self, name, encode, token_bytes, n_vocab, eot=None, encode_prompt=None):
        self.name, self.encode, self.token_bytes, self.n_vocab, self.eot = name, encode, token_bytes, n_vocab, eot
        self._encode_prompt = encode_prompt or encode

    def decode(self, ids):
        return self.token_bytes(ids).decode('utf-8', errors='replace')

    def encode_prompt(self, text):
        """A prompt's ids; an empty prompt becomes <|endoftext|> (GPT-2) or a newline (char-level)."""
        ids = self._encode_prompt(text) if text else []
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

    def token_bytes(ids):
        try:
            return ''.join(itos[i] for i in ids).encode('utf-8')
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in the vocabulary of {len(itos)} characters") from None
    return Tokenizer('char', encode, token_bytes, len(itos))


def gpt2_tokenizer():
    import tiktoken
    enc = tiktoken.get_encoding('gpt2')
    # a prompt may hold <|endoftext|> as nanoGPT's sample.py allows; training text never does
    return Tokenizer('gpt2', enc.encode_ordinary, enc.decode_bytes, enc.n_vocab, eot=enc.eot_token,
                     encode_prompt=lambda text: enc.encode(text, allowed_special={'<|endoftext|>'}))


class _PlainDataUnpickler(pickle.Unpickler):
    """meta.pkl holds only dicts, lists, strings, bytes and numbers. A server may be asked to
    load any directory, and unpickling can run code: refuse anything that names a class."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"meta.pkl refers to {module}.{name}; only plain data is allowed")


def read_meta(path):
    with open(path, 'rb') as f:
        return _PlainDataUnpickler(f).load()


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
        return gpt2_tokenizer()
    raise ValueError(f"unknown tokenizer '{kind}' in meta.pkl")


def load_tokenizer(out_dir=None, dataset=None):
    """The tokenizer of a model: see meta_path_for; GPT-2's BPE when there is no meta.pkl."""
    path = meta_path_for(out_dir, dataset)
    if path is None:
        return gpt2_tokenizer()
    print(f"Loading meta from {path}...", file=sys.stderr)
    try:
        return tokenizer_from_meta(read_meta(path))
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a valid meta.pkl: {e}") from None


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


def render_chat(tokenizer, messages):
    """A conversation, [(role, text), ...], as the prompt ids for the assistant's next reply,
    and the stop strings that end that reply. A base model has never seen a chat: it gets a
    plain transcript to continue after 'Assistant:', and stops where it would write the next turn."""
    text = '\n'.join(f"{CHAT_ROLES[role]}: {content}" for role, content in messages) + '\nAssistant:'
    return tokenizer.encode_prompt(text), [f"\n{name}:" for name in CHAT_ROLES.values()]
