"""
Beam search through the decode engine gives transformers' generate(num_beams=N) token for token,
on the same weights (export.py's conversion), beside free rows in the same batch; and as text,
through textgen.generate_text (what sample.py --num_beams runs).
"""
import pytest
import torch

from engine import Engine, Row, beam_rows
from hf import to_hf
from model import GPT, GPTConfig
from textgen import generate_text
from tokenizer import char_tokenizer

pytestmark = pytest.mark.usefixtures('one_thread')
EOT = 0


def make_model(seed, eot_boost):
    """A random GPT-2-shaped model whose end-of-text token is made likelier by eot_boost, so the
    beams end at different lengths (and the early-stopping rule is exercised)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=40, bias=True)).eval()
    with torch.no_grad():
        model.transformer.wte.weight[EOT] += eot_boost * torch.randn(32)
    return model


def transformers_beams(model, prompt, num_beams, max_new_tokens, **processors):
    from transformers import GPT2LMHeadModel
    config, state = to_hf(model, 40, eot=EOT)
    hf = GPT2LMHeadModel(config).eval()
    hf.load_state_dict(state, strict=False)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), num_beams=num_beams, num_return_sequences=num_beams,
                          max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=EOT, pad_token_id=EOT,
                          **processors)
    return [seq[len(prompt):].tolist() for seq in out]  # padded with EOT after a beam's end


@pytest.mark.parametrize('seed, eot_boost, num_beams', [(0, 0.0, 3), (1, 0.3, 2), (1, 0.3, 4), (3, 0.9, 4)])
def test_beams_are_transformers_beams(seed, eot_boost, num_beams):
    model = make_model(seed, eot_boost)
    prompt = [5, 6, 7, 8]
    engine = Engine(model, num_beams + 1, 20)
    free = Row([9, 10], 20, temperature=1.0, seed=3)  # a sampled row in the same batch
    rows = beam_rows(prompt, num_beams, 20, stop_tokens=[EOT])
    engine.add([free])
    engine.add(rows)
    while engine.rows:
        engine.step()
    theirs = transformers_beams(model, prompt, num_beams, 20)
    for row, want in zip(rows, theirs):
        assert row.tokens == want[:len(row.tokens)] and set(want[len(row.tokens):]) <= {EOT}
        assert row.finish_reason == ('stop' if row.tokens[-1] == EOT else 'length')
    alone = Engine(model, 1, 20)
    again = Row([9, 10], 20, temperature=1.0, seed=3)
    alone.add([again])
    while alone.rows:
        alone.step()
    assert free.tokens == again.tokens


def test_generate_text_num_beams():
    """textgen.generate_text(num_beams=...) (what sample.py --num_beams runs) gives transformers' best beam as text."""
    chars = sorted(set('abcdefghij \n'))
    tok = char_tokenizer({'stoi': {c: i for i, c in enumerate(chars)}, 'itos': dict(enumerate(chars))})
    torch.manual_seed(1)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=len(chars), bias=True)).eval()
    from transformers import GPT2LMHeadModel
    config, state = to_hf(model)
    hf = GPT2LMHeadModel(config).eval()
    hf.load_state_dict(state, strict=False)
    with torch.no_grad():
        best = hf.generate(torch.tensor([tok.encode('abc')]), num_beams=3, max_new_tokens=12, do_sample=False)[0, 3:]
    text = ''.join(piece for _, piece in generate_text(model, tok, ['abc'], 12, num_beams=3))
    assert text == tok.decode(best.tolist()) and len(text) == 12


@pytest.mark.parametrize('ours, theirs', [
    (dict(repetition_penalty=1.8), dict(repetition_penalty=1.8)),
    (dict(logit_bias={11: -4.0, 12: 3.0}), dict(sequence_bias={(11,): -4.0, (12,): 3.0})),
    (dict(repetition_penalty=0.7, logit_bias={EOT: 2.5}), dict(repetition_penalty=0.7, sequence_bias={(EOT,): 2.5}))])
def test_beams_apply_penalties_and_bias_as_transformers_does(ours, theirs):
    """The repetition penalty and logit_bias act on each beam's log probabilities, as transformers' logits
    processors do in its beam search (the penalty over the prompt and the beam's own tokens so far)."""
    model = make_model(2, 0.3)
    prompt = [5, 6, 7, 8, 5, 6]
    engine = Engine(model, 3, 16)
    rows = beam_rows(prompt, 3, 16, stop_tokens=[EOT], **ours)
    engine.add(rows)
    while engine.rows:
        engine.step()
    plain = beam_rows(prompt, 3, 16, stop_tokens=[EOT])
    engine.add(plain)
    while engine.rows:
        engine.step()
    assert [r.tokens for r in rows] != [r.tokens for r in plain]  # the setting changed the search
    for row, want in zip(rows, transformers_beams(model, prompt, 3, 16, **theirs)):
        assert row.tokens == want[:len(row.tokens)] and set(want[len(row.tokens):]) <= {EOT}


def test_a_stop_string_ends_a_beam_and_the_choices_differ():
    """A beam whose text reaches a stop string is a finished hypothesis ('stop'), cut there as text; two
    that would read the same after the cut count once, so the choices differ."""
    from textgen import stop_key
    chars = sorted(set('abcdefghij \n'))
    tok = char_tokenizer({'stoi': {c: i for i, c in enumerate(chars)}, 'itos': dict(enumerate(chars))})
    torch.manual_seed(1)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=len(chars), bias=True)).eval()
    free = ''.join(piece for _, piece in generate_text(model, tok, ['abc'], 12, num_beams=3))
    for stops in ([free[3:5]], [free[2]], [free[3:5], 'a', ' ', 'e']):
        key = stop_key(tok, stops)
        engine = Engine(model, 3, 12)
        group = beam_rows(tok.encode('abc'), 3, 12, stops=key)
        engine.add(group)
        while engine.rows:
            engine.step()
        texts = [key(r.tokens) if r.finish_reason == 'stop' else tok.decode(r.tokens) for r in group]
        assert len(set(texts)) == 3, texts
        for r, text in zip(group, texts):
            assert (r.finish_reason == 'stop') == (key(r.tokens) is not None)
            assert key(r.tokens[:-1]) is None  # it ended at the token that completed its stop string
            assert not any(s in text for s in stops)
        best = ''.join(piece for _, piece in generate_text(model, tok, ['abc'], 12, num_beams=3, stop=stops))
        assert best == texts[0]
