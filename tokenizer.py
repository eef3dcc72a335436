"""
Tokenizers: text <-> token ids, read from the meta.pkl a data/*/prepare.py script writes.

- 'char': one token per character; meta.pkl holds the stoi/itos tables.
- 'gpt2': OpenAI's GPT-2 BPE through tiktoken (which downloads its two files once, or reads
  them from TIKTOKEN_CACHE_DIR), optionally with the chat special tokens appended.
- 'bpe': a byte-level BPE trained on your own text with rustbpe (train_bpe); meta.pkl holds
  its ranks, split pattern and special tokens, so only tiktoken is needed to use it.
- 'hf': a transformers model's own tokenizer (Llama models: SmolLM2, TinyLlama, ...): its
  tokenizer.json read by the tokenizers library, and its chat template (hf_tokenizer_meta).

load_tokenizer() is the one place that finds and reads a model's meta.pkl; sample.py,
serve.py, bench.py and the prepare scripts all go through it. render_chat() is the one
rendering of a conversation: prepare, sample.py --chat and serve.py all call it.
"""
import datetime
import hashlib
import json
import os
import pickle
import re
import sys

# GPT-4's split pattern (cl100k_base), except that numbers split into single digits as
# LLaMA's tokenizer does: arithmetic then sees every digit as a token of its own
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|"""
                 r"""\s+(?!\S)|\s+""")
# a chat model's turns, then its calculator calls and their results (nanochat's nine); ids come right after
# the ordinary tokens. A meta.pkl written before the last four existed keeps its five, with the same ids.
SPECIAL_TOKENS = ['<|bos|>', '<|user_start|>', '<|user_end|>', '<|assistant_start|>', '<|assistant_end|>',
                  '<|python_start|>', '<|python_end|>', '<|output_start|>', '<|output_end|>']
MAX_VOCAB = 65536  # token files hold uint16 ids


class Tokenizer:
    """encode(text) -> ids, decode(ids) -> text, token_bytes(ids) -> the exact bytes (for
    streaming, where a BPE token may end inside a UTF-8 character). n_vocab is the number of
    ids it can produce and decode; eot is GPT-2's <|endoftext|> id (None otherwise).
    encode never produces a special token: text that spells one is ordinary text.
    special_tokens: {name: id} of the chat tokens; key: what must match for two tokenizers
    to give the same ids to ordinary text (a fine-tune checks its base model's); chat_template, stop_ids:
    a transformers model's own (hf_tokenizer)."""

    def __init__(self, name, encode, token_bytes, n_vocab, eot=None, encode_prompt=None, special_tokens=None, key=None,
                 chat_template=None, stop_ids=()):
        self.name, self.encode, self.token_bytes, self.n_vocab, self.eot = name, encode, token_bytes, n_vocab, eot
        self._encode_prompt = encode_prompt or encode
        self.special_tokens = dict(special_tokens or {})
        self.key = key or (name,)
        self.chat_template = chat_template  # a model's own ChatTemplate (render_chat uses it), or None
        self.stop_ids = list(stop_ids)  # more ids that end a generation (a model's generation_config.json)

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


def byte_chars():
    """GPT-2's printable stand-in for every byte: byte-level BPE files (vocab.json, merges.txt,
    tokenizer.json, GGUF) write tokens as strings of these characters."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


# what transformers names a tokenizer's special tokens (tokenizer_config.json); chat templates see them by these names
SPECIAL_NAMES = ('bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token', 'cls_token', 'mask_token')
# the files of a transformers model directory that hold its tokenizer and chat template
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'chat_template.jinja',
                   'generation_config.json')


def pretrained_dir(name_or_path, weights=True):
    """A local directory holding a transformers model: name_or_path itself when it is one, else the hub
    model of that id ('HuggingFaceTB/SmolLM2-135M'), whose tokenizer files (and config and weights)
    huggingface_hub downloads once into its cache. ValueError when it is neither."""
    if os.path.isdir(name_or_path):
        return name_or_path
    try:
        from huggingface_hub import snapshot_download
        weight_files = ['config.json', '*.safetensors', '*.safetensors.index.json'] if weights else []
        return snapshot_download(name_or_path, allow_patterns=[*TOKENIZER_FILES, *weight_files])
    except Exception as e:  # a bad id, no network, no such model
        reason = (str(e).strip().splitlines() or [''])[0]
        raise ValueError(f"{name_or_path} is not a local directory, and cannot be downloaded from the Hugging Face "
                         f"hub: {type(e).__name__}: {reason}") from None


def hf_tokenizer_meta(path):
    """meta.pkl's dict for the tokenizer of a transformers model directory: its tokenizer.json as text,
    its chat template and special token names (tokenizer_config.json, chat_template.jinja) and the ids its
    generation_config.json ends a generation with. Plain data, so out_dir/meta.pkl can carry it."""
    def read(name, default=None, parse=True):
        try:
            with open(os.path.join(path, name), encoding='utf-8') as f:
                return json.load(f) if parse and name.endswith('.json') else f.read()
        except FileNotFoundError:
            return default
    try:
        text = read('tokenizer.json', parse=False)
        config = {**read('special_tokens_map.json', {}), **read('tokenizer_config.json', {})}
        generation = read('generation_config.json', {})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the tokenizer in {path}: {e}")
    if text is None:
        raise ValueError(f"{path} has no tokenizer.json")
    from tokenizers import Tokenizer as Library
    try:
        n = Library.from_str(text).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # the tokenizers library's own error type
        raise ValueError(f"{path}/tokenizer.json is not a tokenizer the tokenizers library reads: {e}") from None
    template = read('chat_template.jinja') or config.get('chat_template')
    if isinstance(template, list):  # several named templates: the default one
        template = next((t['template'] for t in template if t.get('name') == 'default'), None)
    names = {k: v['content'] if isinstance(v, dict) else v for k in SPECIAL_NAMES if (v := config.get(k))}
    stop = generation.get('eos_token_id')
    return {'tokenizer': 'hf', 'tokenizer_json': text, 'chat_template': template, **names,
            'stop_ids': stop if isinstance(stop, list) else [stop] if isinstance(stop, int) else [],
            'vocab_size': n, 'dtype': 'uint16' if n <= 65536 else 'uint32'}


def hf_tokenizer(meta):
    """A Tokenizer over a tokenizer.json (the tokenizers library): byte-level BPE as SmolLM2's or Llama 3's,
    or SentencePiece-style BPE (▁ for a space, <0x..> byte tokens) as Llama 2's and TinyLlama's.
    encode() keeps text that spells a special token as text; a prompt, like a chat template's
    rendering, gets its special tokens (and a BOS where the tokenizer adds one), as transformers does."""
    from tokenizers import Tokenizer as Library
    full = Library.from_str(meta['tokenizer_json'])
    ordinary = Library.from_str(meta['tokenizer_json'])
    ordinary.encode_special_tokens = True
    vocab, added = full.get_vocab(with_added_tokens=True), full.get_added_tokens_decoder()
    byte_level = '"ByteLevel"' in json.dumps(json.loads(meta['tokenizer_json']).get('decoder'))
    unbyte = {c: b for b, c in byte_chars().items()}
    # each id's exact bytes, so a stream can join pieces of a character split across tokens
    table = [b''] * (max(vocab.values()) + 1)
    for piece, i in vocab.items():
        if not byte_level and re.fullmatch(r'<0x[0-9A-F]{2}>', piece):  # SentencePiece's byte fallback
            table[i] = bytes([int(piece[3:5], 16)])
        elif i in added:
            table[i] = piece.encode('utf-8')
        elif byte_level and all(c in unbyte for c in piece):
            table[i] = bytes(unbyte[c] for c in piece)
        else:
            table[i] = piece.replace('\u2581', ' ').encode('utf-8')

    def token_bytes(ids):
        try:
            return b''.join(table[i] for i in ids)
        except (IndexError, TypeError):
            raise ValueError(f"token ids must be in 0..{len(table) - 1}") from None
    names = {k: meta[k] for k in SPECIAL_NAMES if meta.get(k)}
    template = ChatTemplate(meta['chat_template'], names, full) if meta.get('chat_template') else None
    return Tokenizer('hf', lambda text: ordinary.encode(text, add_special_tokens=False).ids, token_bytes, len(table),
                     eot=vocab.get(names.get('eos_token')), encode_prompt=lambda text: full.encode(text).ids,
                     special_tokens={t.content: i for i, t in added.items() if t.special},
                     key=('hf', hashlib.sha256(full.to_str().encode()).hexdigest()), chat_template=template,
                     stop_ids=meta.get('stop_ids', ()))


def one_line(e):
    """An exception in one line of at most 300 characters; a template's own raise_exception as its message."""
    text = ' '.join(str(e).split())
    return (text if type(e).__name__ == 'TemplateError' and text else f"{type(e).__name__}: {text}")[:300]


class ChatTemplate:
    """A model's own chat template (jinja) rendered as transformers' apply_chat_template renders it:
    a sandbox with the same options, filters and names, and the rendered text tokenized with its
    special tokens recognised (so, as there, a message that spells one gets that token). A template comes
    with a model from anywhere, so it renders on a budget: a template that raises, or loops, or builds
    text without end is a ValueError in one line, never a hang or all the memory."""
    MAX_STEPS = 1_000_000  # range() items one rendering may step through
    MAX_CHARS = 4_000_000  # characters one rendering may write or build in one string

    def __init__(self, source, names, library_tokenizer):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
        budget = self

        class Bounded(ImmutableSandboxedEnvironment):
            intercepted_binops = frozenset(['*', '**'])

            def call_binop(self, context, operator, left, right):
                # 'x' * 10**10 would build a 10 GB string before anything could stop it
                sizes = [len(a) * b for a, b in ((left, right), (right, left))
                         if isinstance(a, (str, list, tuple)) and isinstance(b, int)]
                if operator == '*' and any(n > budget.MAX_CHARS for n in sizes):
                    raise SecurityError("the template builds a string or list too long")
                if operator == '**' and isinstance(right, (int, float)) and abs(right) > 64:
                    raise SecurityError("the template raises a number to a power too large")
                return super().call_binop(context, operator, left, right)

        def counted_range(*args):
            for i in range(*args):
                budget.steps += 1
                if budget.steps > budget.MAX_STEPS:
                    raise SecurityError(f"the template loops more than {budget.MAX_STEPS:,} times")
                yield i

        def raise_exception(message):
            raise jinja2.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # no HTML escaping
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=['jinja2.ext.loopcontrols'])
        env.filters['tojson'] = tojson
        env.globals.update(raise_exception=raise_exception, range=counted_range,
                           strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
        try:
            self.template = env.from_string(source)
        except Exception as e:  # jinja's syntax errors, and whatever else a broken template source raises
            raise ValueError(f"cannot read the chat template: {one_line(e)}")
        self.names, self.library = names, library_tokenizer

    def render(self, messages, add_generation_prompt):
        """The text of [(role, content), ...]; with add_generation_prompt, followed by the assistant's header."""
        self.steps, chunks, n = 0, [], 0
        try:
            for chunk in self.template.generate(messages=[{'role': r, 'content': c} for r, c in messages], tools=None,
                                                documents=None, add_generation_prompt=add_generation_prompt,
                                                **self.names):
                n += len(chunk)
                if n > self.MAX_CHARS:
                    raise ValueError(f"it writes more than {self.MAX_CHARS:,} characters")
                chunks.append(chunk)
        except Exception as e:  # raise_exception, a sandbox refusal, 1/0, a recursion without end ...
            raise ValueError(f"the chat template refuses this conversation: {one_line(e)}") from None
        return ''.join(chunks)

    def prompt(self, messages):
        return self.library.encode(self.render(messages, True), add_special_tokens=False).ids

    def tokens(self, messages):
        """(ids, mask) of a whole conversation, as chat_tokens. A reply is what rendering it adds after the
        conversation before it with the assistant's header: its text and the template's end of turn."""
        text, replies = self.render(messages, False), []
        for i, (role, _) in enumerate(messages):
            if role == 'assistant':
                before, through = self.render(messages[:i], True), self.render(messages[:i + 1], False)
                if not (through.startswith(before) and text.startswith(through)):
                    raise ValueError("the chat template does not render a conversation turn after turn: its replies "
                                     "cannot be told apart for the loss")
                replies.append((len(before), len(through)))
        encoding = self.library.encode(text, add_special_tokens=False)
        mask = [int(any(start < b and end > a for a, b in replies)) for start, end in encoding.offsets]
        return encoding.ids, mask


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
    if kind == 'hf':
        return hf_tokenizer(meta)
    raise ValueError(f"unknown tokenizer '{kind}' in meta.pkl")


def load_tokenizer(out_dir=None, dataset=None):
    """The tokenizer of a model: see meta_path_for; for a transformers model directory without one,
    its tokenizer.json (hf_tokenizer); GPT-2's BPE when there is neither."""
    path = meta_path_for(out_dir, dataset)
    if path is None and out_dir and os.path.exists(os.path.join(out_dir, 'tokenizer.json')):
        return hf_tokenizer(hf_tokenizer_meta(out_dir))
    if path is None:
        return gpt2_tokenizer()
    print(f"Loading meta from {path}...", file=sys.stderr)
    meta = read_meta(path)
    try:
        return tokenizer_from_meta(meta)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a valid meta.pkl: {type(e).__name__}: {e}") from None


def same_tokenizer(a, b):
    """Whether two tokenizers give text the same ids: the same one, or (GPT-2's BPE through tiktoken and
    through a tokenizer.json) the same ids on a text of words, digits, spaces and other scripts."""
    def ids(tokenizer):
        try:
            return tokenizer.encode("It's 1,234.5 -- naïve café, 日本語 🤖\n\n  THE END. ")
        except ValueError:  # a character vocabulary without these characters
            return None
    return a.key == b.key or ids(a) is not None and ids(a) == ids(b)


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


# an assistant message's content parts: text, a calculator call, the calculator's output (nanochat's form)
PART_TOKENS = {'python': ('<|python_start|>', '<|python_end|>'), 'python_output': ('<|output_start|>', '<|output_end|>')}


def content_text(content):
    """A message's content as text: a string as it is; content parts as the reply decodes, the calculator's
    call and output between their special tokens' names ("<|python_start|>6*7<|python_end|><|output_start|>42...")."""
    if isinstance(content, str):
        return content
    pieces = []
    for part in content:
        start, end = PART_TOKENS.get(part['type'], ('', ''))
        pieces.append(start + part['text'] + end)
    return ''.join(pieces)


def reply_content(text):
    """content_text undone, for a reply the model wrote: its calculator calls and outputs as parts again
    (the text itself when it has none), so the next turn renders them with their special tokens."""
    calls = '|'.join(f'{re.escape(start)}.*?{re.escape(end)}' for start, end in PART_TOKENS.values())
    pieces = re.split(f'({calls})', text, flags=re.S)  # odd pieces are the calls and outputs
    if len(pieces) == 1:
        return text
    parts = []
    for i, piece in enumerate(pieces):
        kind = next((k for k, (start, _) in PART_TOKENS.items() if i % 2 and piece.startswith(start)), 'text')
        if kind != 'text':
            parts.append({'type': kind, 'text': piece[len(PART_TOKENS[kind][0]):-len(PART_TOKENS[kind][1])]})
        elif piece:
            parts.append({'type': 'text', 'text': piece})
    return parts


def chat_tokens(tokenizer, messages):
    """A whole conversation, [(role, content), ...], in a chat tokenizer's special tokens: its ids
    and a mask, 1 where the token is one the model learns to produce (the assistant's reply and
    its <|assistant_end|>). <|bos|> <|user_start|>...<|user_end|> <|assistant_start|>...<|assistant_end|> ...
    A system message has no tokens of its own: it opens the next user turn (as nanochat does),
    so a model fine-tuned without system messages still reads it as part of the question.
    An assistant's content may be a list of parts (see parse_conversation): a calculator call is
    <|python_start|>expr<|python_end|>, learned; its output <|output_start|>result<|output_end|> is
    not, as the calculator, not the model, writes it when the model runs."""
    if tokenizer.chat_template is not None:  # a model's own template: see ChatTemplate.tokens
        if any(not isinstance(content, str) for _, content in messages):
            raise ValueError("calculator calls need this project's chat tokens; a model's own chat template has none")
        return tokenizer.chat_template.tokens(messages)
    special = tokenizer.special_tokens
    ids, mask = [special['<|bos|>']], [0]
    system = []
    for role, content in messages:
        if role == 'system':
            system.append(content)
            continue
        if role == 'user' and system:
            content, system = '\n\n'.join(system + [content]), []
        learn = int(role == 'assistant')
        ids.append(special[f'<|{role}_start|>'])
        mask.append(0)
        for kind, text in ([('text', content)] if isinstance(content, str) else
                           [(part['type'], part['text']) for part in content]):
            text = tokenizer.encode(text)
            if kind == 'text':
                ids += text
                mask += [learn] * len(text)
                continue
            if PART_TOKENS[kind][0] not in special:
                raise ValueError(f"this tokenizer has no {PART_TOKENS[kind][0]} token (it was made before the calculator "
                                 f"tokens existed): prepare the data with a new one to train calculator calls")
            start, end = (special[name] for name in PART_TOKENS[kind])
            ids += [start, *text, end]
            mask += [int(kind == 'python')] * (len(text) + 2)
        ids.append(special[f'<|{role}_end|>'])
        mask.append(learn)
    return ids, mask


def render_chat(tokenizer, messages):
    """A conversation, [(role, content), ...], as the prompt ids for the assistant's next reply,
    and the stop strings that end that reply. A chat tokenizer renders chat_tokens and
    <|assistant_start|>; the reply ends at <|assistant_end|> (textgen.stop_tokens_of).
    A base model has never seen a chat: it gets a plain transcript to continue after
    'Assistant:', and stops where it would write the next turn. A model with its own chat template
    (a transformers model's) gets that, and stops at its end-of-turn token (stop_tokens_of)."""
    if tokenizer.chat_template is not None:
        return tokenizer.chat_template.prompt(messages), []
    if '<|assistant_start|>' in tokenizer.special_tokens:
        ids, _ = chat_tokens(tokenizer, messages)
        return ids + [tokenizer.special_tokens['<|assistant_start|>']], []
    text = '\n'.join(f"{CHAT_ROLES[role]}: {content_text(content)}" for role, content in messages) + '\nAssistant:'
    return tokenizer.encode_prompt(text), [f"\n{name}:" for name in CHAT_ROLES.values()]


def parse_conversation(line):
    """[(role, content), ...] from one JSONL line; ValueError saying what is wrong. content is a string;
    an assistant's may also be a list of parts, each {"type": "text" | "python" | "python_output", "text": "..."}:
    "python" is a calculator call (an arithmetic expression), "python_output" what the calculator answered."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at column {e.colno})")
    return conversation_of(obj)


def conversation_of(obj):
    """[(role, content), ...] from {"messages": [...]} (see parse_conversation); ValueError saying what is wrong."""
    messages = obj.get('messages') if isinstance(obj, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError('expected {"messages": [...]} with at least one message')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get('role') not in CHAT_ROLES or not (
                isinstance(m.get('content'), str) or m.get('role') == 'assistant' and is_parts(m.get('content'))):
            raise ValueError(f"messages[{i}] must be {{\"role\": {'|'.join(CHAT_ROLES)}, \"content\": a string}}, an "
                             f"assistant's content may be a list of {{\"type\": text|python|python_output, \"text\": a string}}")
        out.append((m['role'], m['content']))
    turns = [role for role, _ in out if role != 'system']
    # the rendering folds a system message into the next user turn, so one may stand before any user turn
    if turns[::2] != ['user'] * len(turns[::2]) or turns[1::2] != ['assistant'] * len(turns[1::2]) or turns[-1:] != ['assistant'] \
            or out[-1][0] != 'assistant':
        raise ValueError("the turns must alternate user, assistant, ..., and end with the assistant's reply")
    if any(role == 'system' for role, _ in out[max(i for i, (role, _) in enumerate(out) if role == 'user'):]):
        raise ValueError("a system message must come before a user message")
    return out


def is_parts(content):
    return isinstance(content, list) and bool(content) and all(
        isinstance(p, dict) and p.get('type') in ('text', *PART_TOKENS) and isinstance(p.get('text'), str) for p in content)


def read_jsonl(path, parse):
    """[parse(line) for each non-blank line of a JSONL file]; ValueError naming the line that is wrong."""
    try:
        with open(path, encoding='utf-8') as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}")
    items = []
    for n, line in enumerate(lines, start=1):
        if line.strip():
            try:
                items.append(parse(line))
            except ValueError as e:  # json.JSONDecodeError is one
                raise ValueError(f"{path} line {n}: {e}")
    return items


def read_conversations(path):
    """The conversations of a JSONL file (OpenAI's messages format, each ending with the
    assistant's reply); ValueError naming the line that is wrong. data/chat/prepare.py and
    chat_eval.py both read through here."""
    return read_jsonl(path, parse_conversation)
