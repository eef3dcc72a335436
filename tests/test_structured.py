"""
Structured output (grammar.py over llguidance): under a JSON schema, or json_object, every sample
of a random-weight model parses and validates, constrained rows and free rows decoding in one
batch; what cannot be followed is refused in one line naming it.
"""
import json
import sys

import pytest
import torch

from engine import Engine, Row
from model import GPT, GPTConfig
from tokenizer import char_tokenizer, gpt2_tokenizer

grammar = pytest.importorskip('grammar')
pytest.importorskip('llguidance')
jsonschema = pytest.importorskip('jsonschema')
pytestmark = pytest.mark.usefixtures('one_thread')

# a JSON-sized alphabet: a random model then closes strings and containers in a few dozen tokens
CHARS = sorted(set('{}[]":,.-0123 \nabtruefalsnxyzmgko'))
SCHEMA = {'type': 'object', 'additionalProperties': False, 'required': ['name', 'age', 'ok'],
          'properties': {'name': {'type': 'string', 'maxLength': 6}, 'age': {'type': 'integer', 'minimum': 0, 'maximum': 150},
                         'tags': {'type': 'array', 'items': {'enum': ['a', 'b']}, 'maxItems': 3},
                         'ok': {'type': 'boolean'}, 'x': {'anyOf': [{'type': 'null'}, {'type': 'integer', 'minimum': -5, 'maximum': 5}]}}}


def char_json_tokenizer():
    return char_tokenizer({'stoi': {c: i for i, c in enumerate(CHARS)}, 'itos': dict(enumerate(CHARS))})


def run(model, rows):
    engine = Engine(model, len(rows), 600)
    engine.add(rows)
    while engine.rows:
        engine.step()
    return rows


@pytest.mark.parametrize('response_format, check', [
    ({'type': 'json_schema', 'json_schema': {'name': 'person', 'schema': SCHEMA}},
     lambda value: jsonschema.validate(value, SCHEMA)),
    ({'type': 'json_object'}, lambda value: jsonschema.validate(value, {'type': 'object'})),
])
def test_100_samples_all_parse_and_validate(response_format, check):
    tok = char_json_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=len(CHARS), use_rope=True)).eval()
    make = grammar.json_grammar(tok, response_format)
    # a nudge towards closing strings and containers keeps a random model's JSON a few dozen tokens long
    closing = {CHARS.index(c): 1.5 for c in '"}]'}
    constrained = [Row(tok.encode('x'), 600, temperature=1.0, seed=i, constraint=make(), logit_bias=closing)
                   for i in range(100)]
    free = [Row(tok.encode('x'), 40, temperature=1.0, seed=i) for i in range(3)]
    run(model, constrained + free)
    for row in constrained:
        assert row.finish_reason == 'stop'
        check(json.loads(tok.decode(row.tokens)))
    for row, seed in zip(free, range(3)):  # the free rows sample as they would alone
        assert row.tokens == run(model, [Row(tok.encode('x'), 40, temperature=1.0, seed=seed)])[0].tokens


def test_gpt2_bpe_tokens_under_a_schema():
    """GPT-2's tokenizer: BPE tokens that hold several JSON characters at once, and <|endoftext|>."""
    tok = gpt2_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=50304)).eval()
    schema = {'type': 'object', 'properties': {'n': {'type': 'integer', 'minimum': 0, 'maximum': 99}, 'b': {'type': 'boolean'}},
              'required': ['n', 'b'], 'additionalProperties': False}
    make = grammar.json_grammar(tok, {'type': 'json_schema', 'json_schema': {'schema': schema}})
    engine = Engine(model, 4, 60, vocab_size=tok.n_vocab)
    rows = run(model, [Row(tok.encode('{'), 60, temperature=1.0, seed=i, constraint=make()) for i in range(4)])
    for row in rows:
        jsonschema.validate(json.loads(tok.decode(row.tokens)), schema)
    del engine


def test_what_cannot_be_followed_is_named(monkeypatch):
    tok = char_json_tokenizer()
    with pytest.raises(grammar.FormatError, match='not'):
        grammar.json_grammar(tok, {'type': 'json_schema', 'json_schema': {'schema': {'not': {'type': 'string'}}}})
    with pytest.raises(grammar.FormatError, match='json_schema.schema'):
        grammar.json_grammar(tok, {'type': 'json_schema', 'json_schema': {}})
    with pytest.raises(grammar.FormatError, match="'text', 'json_object' or 'json_schema'"):
        grammar.json_grammar(tok, {'type': 'yaml'})
    assert grammar.json_grammar(tok, {'type': 'text'}) is None
    monkeypatch.setitem(sys.modules, 'llguidance', None)  # as if it were not installed
    with pytest.raises(grammar.FormatError, match='pip install llguidance'):
        grammar.json_grammar(tok, {'type': 'json_object'})


def test_a_grammar_that_cannot_start_is_refused_before_any_row():
    """A $ref to itself or a cycle of $defs stop the grammar engine at once; a vocabulary without '{' or digits
    cannot begin an object or a number: each is a FormatError (a 400) in one line, never the engine's state
    dump; schema true is json_object's, false is refused."""
    json_tok = char_json_tokenizer()
    no_json = char_tokenizer({'stoi': {c: i for i, c in enumerate('abc \n')}, 'itos': dict(enumerate('abc \n'))})
    cycle = {'$defs': {'a': {'$ref': '#/$defs/b'}, 'b': {'$ref': '#/$defs/a'}}, '$ref': '#/$defs/a'}
    for tok, schema, what in [(json_tok, {'$ref': '#'}, 'cannot be followed'), (json_tok, cycle, 'cannot be followed'),
                              (no_json, {'enum': [1, 2]}, 'cannot be followed'), (json_tok, False, 'false'),
                              (no_json, None, 'cannot write')]:
        fmt = {'type': 'json_object'} if schema is None else {'type': 'json_schema', 'json_schema': {'schema': schema}}
        with pytest.raises(grammar.FormatError, match=what) as e:
            grammar.json_grammar(json_tok if tok is json_tok else tok, fmt)
        assert '\n' not in str(e.value) and 'lexer_cost' not in str(e.value) and len(str(e.value)) < 300
    make = grammar.json_grammar(json_tok, {'type': 'json_schema', 'json_schema': {'schema': True}})
    words = make().mask.copy()
    make().fill_bitmask(words)
    assert [c for i, c in enumerate(CHARS) if (words[i // 32] >> (i % 32)) & 1 and c.strip()] == ['{']


def test_a_grammar_that_fails_mid_row_ends_the_row_as_an_error():
    """A pattern whose nested repeats exhaust the grammar engine while the row writes: the row ends with
    finish_reason 'error' and a one-line reason, never as 'stop' with the JSON half written."""
    tok = char_json_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=len(CHARS), bias=False)).eval()
    schema = {'type': 'string', 'pattern': '^((((a{1,50}){1,50}){1,50}){1,50})$'}
    make = grammar.json_grammar(tok, {'type': 'json_schema', 'json_schema': {'schema': schema}})
    # only 'a' inside the string (the closing quote held off), so it runs into the engine's limit
    row, = run(model, [Row(tok.encode('x'), 60, temperature=1.0, seed=1, constraint=make(),
                           logit_bias={CHARS.index('"'): -50, CHARS.index('a'): 50})])
    assert row.finish_reason == 'error' and isinstance(row.error, grammar.GrammarError), (row.finish_reason, row.tokens)
    assert '\n' not in str(row.error) and 'Parser' not in str(row.error)
