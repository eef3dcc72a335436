"""
The decode engine: every setting a request may send samples without a numerical error, ids
past the tokenizer's vocabulary are never sampled, rows with different settings decode as
they would alone, and a fault in one row (while it is prefilled, decoded or sampled) ends
that row only.
"""
import pytest
import torch

import engine as engine_module
from engine import Engine, Row, SettingError, generate
from model import GPT, GPTConfig
from textgen import generate_text
from tokenizer import gpt2_tokenizer


pytestmark = pytest.mark.usefixtures('one_thread')


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=40, dropout=0.0)
    return GPT(GPTConfig(**dict(config, **overrides))).eval()


def run(engine, rows):
    engine.add(rows)
    while engine.rows:
        engine.step()
    return rows


@pytest.mark.parametrize('settings', [
    dict(temperature=1e-39), dict(temperature=1e-300, top_k=5), dict(temperature=1e-45, top_p=0.5),
    dict(top_p=1e-46), dict(top_p=1e-300, top_k=3), dict(repetition_penalty=1e-44),
    dict(repetition_penalty=100.0, temperature=100.0), dict(temperature=100.0, top_k=1),
    dict(presence_penalty=2.0, frequency_penalty=-2.0, temperature=3e-6), dict(logit_bias={3: -100, 4: 100}),
    dict(logit_bias={i: -100 for i in range(40)}, temperature=0.5), dict(top_k=1000, top_p=0.999999),
])
def test_every_accepted_setting_samples_safely(settings):
    """Values that pass validation but are too small to divide by, or filters that would leave
    nothing: greedy or a proper distribution, never a NaN or an empty one."""
    model = make_model()
    rows = [Row([1, 2, 3], 25, seed=i, **settings) for i in range(3)] + [Row([5], 25, seed=9)]
    run(Engine(model, 4, 25), rows)
    for row in rows:
        assert row.error is None and row.finish_reason == 'length' and len(row.tokens) == 25
        assert all(0 <= t < 40 for t in row.tokens)
    if settings.get('logit_bias', {}).get(4) == 100:
        assert set(rows[0].tokens) == {4}


def test_tiny_temperature_is_greedy():
    model = make_model(seed=1)
    greedy = generate(model, [[1, 2, 3]], 20, temperature=0)[0]
    assert generate(model, [[1, 2, 3]], 20, temperature=1e-39, seed=5)[0] == greedy
    assert generate(model, [[1, 2, 3]], 20, top_p=1e-46, seed=5)[0] == greedy


def test_bad_settings_are_refused_by_name():
    for name, value in [('temperature', -1), ('top_k', -1), ('top_p', 0), ('top_p', 1.5), ('repetition_penalty', 0),
                        ('presence_penalty', 3), ('frequency_penalty', -2.5), ('logprobs', 21), ('max_tokens', -1)]:
        with pytest.raises(SettingError) as e:
            Row([1], **dict({'max_tokens': 5}, **{name: value}))
        assert e.value.name == name
    with pytest.raises(SettingError) as e:
        Row([1], 5, logit_bias={3: 101})
    assert e.value.name == 'logit_bias'
    engine = Engine(make_model(), 2, 10)
    for row, name in [(Row([1, 40], 5), 'prompt'), (Row([1], 5, logit_bias={40: 1}), 'logit_bias'),
                      (Row([1], 11), 'max_tokens')]:
        with pytest.raises(SettingError) as e:
            engine.add([row])
        assert e.value.name == name and not engine.rows


def test_padded_vocabulary_is_never_sampled():
    """A GPT-2-BPE model trained here has 50304 ids, 47 more than the tokenizer decodes. Make
    the extra ones the most likely: with 8 rows and hundreds of tokens, none comes out, and
    the text decodes."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=50304)).eval()
    with torch.no_grad():
        model.lm_head.weight[50257:] = 5.0  # tied: the embedding rows too, harmless here
    tokenizer = gpt2_tokenizer()
    engine = Engine(model, 8, 300, vocab_size=tokenizer.n_vocab)
    rows = run(engine, [Row([464, 3290], 300, temperature=2.0, seed=i) for i in range(8)])
    tokens = [t for row in rows for t in row.tokens]
    assert len(tokens) == 8 * 300 and max(tokens) < 50257
    text = ''.join(piece for _, piece in generate_text(model, tokenizer, ['The'] * 4, 100, temperature=2.0, seed=1))
    assert text


def test_rows_with_different_settings_decode_as_alone():
    """One vectorised sampling call for rows with different settings gives each row what it
    gets alone: its own temperature, filters, penalties and random stream."""
    model = make_model(seed=2)
    settings = [dict(temperature=0), dict(temperature=0.7, top_k=5, seed=1), dict(temperature=1.3, top_p=0.8, seed=2),
                dict(temperature=1.0, repetition_penalty=1.5, presence_penalty=0.5, seed=3),
                dict(temperature=0.9, logit_bias={7: 5.0}, frequency_penalty=1.0, seed=4),
                dict(temperature=1.0, top_k=3, top_p=0.6, seed=5)]
    prompts = [[1, 2, 3], [4] * 20, [5, 6], [7, 8, 9, 10], [11], [12, 13]]
    together = run(Engine(model, 6, 40), [Row(p, 40, **s) for p, s in zip(prompts, settings)])
    for p, s, row in zip(prompts, settings, together):
        alone = run(Engine(model, 1, 40), [Row(p, 40, **s)])[0]
        assert row.tokens == alone.tokens, s


def test_rows_join_and_leave_between_steps():
    model = make_model(seed=3)
    engine = Engine(model, 3, 30)
    first = Row([1, 2], 30, temperature=0)
    engine.add([first])
    for _ in range(5):
        engine.step()
    late = [Row([3, 4, 5], 10, temperature=0), Row([3, 4, 5], 10, temperature=0)]  # one prompt, two samples
    engine.add(late)
    while engine.rows:
        engine.step()
    assert [r.finish_reason for r in [first, *late]] == ['length'] * 3
    assert first.tokens == generate(model, [[1, 2]], 30, temperature=0)[0]
    assert late[0].tokens == late[1].tokens == generate(model, [[3, 4, 5]], 10, temperature=0)[0]


def test_stop_tokens_and_finish():
    model = make_model(seed=4)
    free = generate(model, [[1, 2, 3]], 30, temperature=0)[0]
    stop = free[7]
    row = run(Engine(model, 1, 30), [Row([1, 2, 3], 30, temperature=0, stop_tokens=[stop])])[0]
    assert row.finish_reason == 'stop' and row.tokens == free[:free.index(stop) + 1]
    engine = Engine(model, 2, 30)
    a, b = Row([1], 30, temperature=0), Row([2], 30, temperature=0)
    engine.add([a, b])
    engine.step()
    engine.finish(a, 'cancelled')
    while engine.rows:
        engine.step()
    assert a.finish_reason == 'cancelled' and len(a.tokens) == 1
    assert b.tokens == generate(model, [[2]], 30, temperature=0)[0]


def test_a_fault_stays_in_its_row(monkeypatch):
    """Faults injected into one row while it is prefilled, while its step is computed and while
    it is sampled: that row ends with the error, every other row generates what it would alone."""
    model = make_model(seed=5)
    POISON_PREFILL, POISON_STEP, MARK_SAMPLE = 31, 32, 0.123
    hidden_states = model.hidden_states

    def faulty_hidden_states(idx, cache=None):
        if idx.size(1) > 1 and (idx == POISON_PREFILL).any():
            raise RuntimeError("prefill fault")
        if idx.size(1) == 1 and (idx == POISON_STEP).any():
            raise RuntimeError("step fault")
        return hidden_states(idx, cache)
    sample_tokens = engine_module.sample_tokens

    def faulty_sample_tokens(logits, temperature, *args):
        if (temperature == MARK_SAMPLE).any():
            raise RuntimeError("sampling fault")
        return sample_tokens(logits, temperature, *args)
    monkeypatch.setattr(model, 'hidden_states', faulty_hidden_states)
    monkeypatch.setattr(engine_module, 'sample_tokens', faulty_sample_tokens)

    avoid = {POISON_PREFILL: -100, POISON_STEP: -100}  # healthy rows never produce a poison token
    healthy = [Row([1, 2, 3], 20, temperature=0, logit_bias=avoid), Row([4, 5], 20, temperature=0.8, seed=1,
                                                                       logit_bias=avoid)]
    engine = Engine(model, 5, 20)
    with pytest.raises(RuntimeError, match='prefill fault'):
        engine.add([Row([POISON_PREFILL, 1, 2], 20)])
    assert not engine.rows  # nothing of it joined
    stepped = Row([6, POISON_STEP], 20, logit_bias=avoid)  # its first step feeds the poison
    sampled = Row([7, 8], 20, temperature=MARK_SAMPLE, logit_bias=avoid)
    engine.add([healthy[0], stepped, sampled, healthy[1]])
    failed = []
    while engine.rows:
        failed += [r for r in engine.step() if r.error is not None]
    assert set(map(id, failed)) == {id(stepped), id(sampled)}
    assert 'step fault' in str(stepped.error) and 'sampling fault' in str(sampled.error)
    assert stepped.finish_reason == sampled.finish_reason == 'error'
    monkeypatch.undo()
    for row in healthy:
        assert row.finish_reason == 'length'
        assert row.tokens == run(Engine(model, 1, 20), [Row(row.prompt, 20, temperature=row.temperature,
                                                            seed=1 if row.temperature else None,
                                                            logit_bias=avoid)])[0].tokens


def test_logprobs_are_the_models_log_softmax():
    model = make_model(seed=6)
    row = run(Engine(model, 1, 6), [Row([1, 2, 3], 6, temperature=0.9, top_k=4, logprobs=3, seed=2)])[0]
    assert len(row.token_logprobs) == 6
    seq = [1, 2, 3] + row.tokens
    with torch.no_grad():
        logits, _ = model(torch.tensor([seq]), targets=torch.zeros(1, len(seq), dtype=torch.long))
    reference = logits[0].log_softmax(-1)
    for i, (logprob, top) in enumerate(row.token_logprobs):
        at = reference[2 + i]
        assert abs(logprob - at[row.tokens[i]].item()) < 1e-4
        assert [t for t, _ in top] == at.topk(3).indices.tolist()
