"""
Structured output: OpenAI's response_format ({"type": "json_object"}, or {"type": "json_schema",
"json_schema": {"schema": ...}}) as a grammar that masks, step by step, the tokens a row may
sample next (engine.py applies the mask inside its one sampling call, so constrained and free
rows decode in one batch).

The grammar engine is llguidance (pip install llguidance), imported only when a request asks
for a format. Chosen over xgrammar and outlines-core (docs/serving.md compares them): a CPU wheel
with no dependency (xgrammar requires triton and apache-tvm-ffi besides torch and transformers),
masks computed on the fly, 0.2 ms a step for GPT-2's 50257 tokens (outlines-core builds an index
over the whole vocabulary per schema first: 112 s for generic JSON here), the widest JSON-schema
coverage, and a tokenizer built from plain token bytes, so char-level and BPE tokenizers both work.
"""
WHITESPACE = r'[ \n]{0,4}'  # between JSON tokens: a little, so a sampled row cannot pad forever
_tokenizers = {}  # one llguidance tokenizer per Tokenizer (~1 s to build for GPT-2's vocabulary)


class FormatError(ValueError):
    """A response_format this server cannot follow (or without llguidance installed), in one line."""


class GrammarError(ValueError):
    """A grammar that failed while a row generated: the row ends as an error, never as a finished text."""


def reason(matcher):
    """The grammar engine's error in one line: its first, without the parser state it dumps after it."""
    text = (matcher.get_error() or 'unknown error').strip().splitlines()[0]
    return text[:200]


def json_grammar(tokenizer, response_format):
    """A function that makes a fresh constraint (one per row) for a response_format, or None for
    {"type": "text"}; FormatError naming what is wrong or unsupported."""
    kind = response_format.get('type') if isinstance(response_format, dict) else None
    if kind == 'text':
        return None
    if kind == 'json_object':
        schema = {'type': 'object'}
    elif kind == 'json_schema':
        spec = response_format.get('json_schema')
        schema = spec.get('schema') if isinstance(spec, dict) else None
        if schema is False:
            raise FormatError("response_format's schema is false: no JSON value satisfies it")
        if schema is True:  # any JSON: as json_object
            schema = {'type': 'object'}
        if not isinstance(schema, dict):
            raise FormatError("response_format.json_schema.schema must be a JSON schema (an object)")
    else:
        raise FormatError(f"response_format.type must be 'text', 'json_object' or 'json_schema', not {kind!r}")
    try:
        import llguidance
    except ImportError:
        raise FormatError("response_format needs the llguidance package on the server: pip install llguidance")
    lltok = _tokenizers.get(tokenizer) or _tokenizers.setdefault(tokenizer, lltokenizer(tokenizer))
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides={'whitespace_pattern': WHITESPACE})
    except ValueError as e:
        raise FormatError(f"response_format's schema: {e}")
    error = llguidance.LLMatcher.validate_grammar(grammar, lltok)
    if error:  # e.g. 'Unimplemented keys: ["not"]'
        raise FormatError(f"response_format's schema is not supported: {error.strip().splitlines()[0][:200]}")
    make = lambda: JSONConstraint(llguidance.LLMatcher(lltok, grammar, log_level=0), lltok.vocab_size)  # noqa: E731
    check_start(make(), tokenizer)
    return make


def check_start(constraint, tokenizer):
    """FormatError unless the grammar can start with this model's vocabulary: its first mask must hold a
    token that writes more than whitespace (a $ref cycle stops the engine at once; a character vocabulary
    without '{' or digits can write no JSON object or number), so no row starts that could only end broken."""
    words = constraint.mask.copy()
    try:
        constraint.fill_bitmask(words)
    except GrammarError as e:
        raise FormatError(f"response_format's schema cannot be followed from its start with this model's vocabulary "
                          f"(a $ref cycle, or nothing the vocabulary can write; {e})")
    allowed = [i for i in range(min(tokenizer.n_vocab, words.size * 32)) if (words[i // 32] >> (i % 32)) & 1]
    if not any(tokenizer.token_bytes([i]).strip() for i in allowed if i not in tokenizer.special_tokens.values()):
        raise FormatError("response_format asks for JSON this model's vocabulary cannot write (no token it has can "
                          "begin it)")


def lltokenizer(tokenizer):
    """llguidance's view of one of our tokenizers: each id's bytes, and the id that ends a text.
    A char-level vocabulary has no such id: it gets one past its last (never sampled, as the
    grammar ends the row itself when the JSON is complete)."""
    import llguidance
    n = tokenizer.n_vocab
    special = set(tokenizer.special_tokens.values()) | ({tokenizer.eot} if tokenizer.eot is not None else set())
    end = tokenizer.eot if tokenizer.eot is not None else tokenizer.special_tokens.get('<|assistant_end|>', n)

    class Wrapped:  # what llguidance.TokenizerWrapper reads
        tokens = [tokenizer.token_bytes([i]) for i in range(n)] + ([b''] if end == n else [])
        eos_token_id, bos_token_id = end, None
        special_token_ids = sorted(special | ({n} if end == n else set()))

        def __call__(self, text):
            try:
                return tokenizer.encode(text.decode('utf-8', errors='replace') if isinstance(text, bytes) else text)
            except ValueError:  # a character a char-level vocabulary lacks: the grammar then allows no token
                return []
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapped()), n_vocab=len(Wrapped.tokens))


class JSONConstraint:
    """One row's grammar state, in the engine's constraint protocol (see engine.Row)."""

    def __init__(self, matcher, n_vocab):
        import numpy as np
        self.matcher = matcher
        self.mask = np.zeros((n_vocab + 31) // 32, dtype=np.int32)  # llguidance's own size

    def fill_bitmask(self, words):
        """Set bit t of the int32 words (numpy) for each token id t the grammar allows next; GrammarError when the
        grammar engine fails (before or while computing the mask: it then allows only the end, which must not
        pass for a finished text)."""
        if not self.matcher.is_error():
            self.matcher.unsafe_compute_mask_ptr(self.mask.ctypes.data, self.mask.nbytes)
        if self.matcher.is_error():
            raise GrammarError(f"the response_format grammar failed: {reason(self.matcher)}")
        n = min(words.size, self.mask.size)
        words[:n] = self.mask[:n]
        words[n:] = 0

    def advance(self, token):
        self.matcher.consume_token(token)
        if self.matcher.is_error():  # a refused token, or a grammar that cannot go on: never a finished text
            raise GrammarError(f"the response_format grammar failed: {reason(self.matcher)}")

    @property
    def done(self):
        return self.matcher.is_stopped() and not self.matcher.is_error()
