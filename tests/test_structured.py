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
