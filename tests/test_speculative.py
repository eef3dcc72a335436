"""
Speculative decoding (speculative.py, draft='ngram'): greedy rows get exactly the tokens plain decoding gets,
batched with rows that do not speculate; sampled rows keep the model's distribution (a chi-square test against
the exact probabilities, one that a wrong rule fails); the KV cache keeps only accepted tokens; stop tokens,
stop strings, penalties, logit_bias, logprobs and calculator calls still apply; grammars and beams refuse it.
"""
import random

import pytest
import torch

from engine import Engine, KVCache, Row, SettingError, beam_rows
from model import GPT, GPTConfig
from sampling import apply_penalties, probabilities
from speculative import PromptLookup
from textgen import generate_text
from test_tools import bpe, bpe_meta, caller  # noqa: F401 (fixtures: a chat model that calls the calculator)

pytestmark = pytest.mark.usefixtures('one_thread')

ARCHS = {'learned': {}, 'rope': dict(use_rope=True), 'alibi': dict(use_alibi=True)}


def tiny(arch='learned', vocab=50, block=64, seed=0, sharpen=1.0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block, vocab_size=vocab, dropout=0.0,
                          **ARCHS[arch])).eval()
    with torch.no_grad():  # larger logits: a peaked distribution, so proposals are both taken and refused
        model.lm_head.weight.mul_(sharpen)
    return model


def run(model, rows, max_rows=None, max_new=40, draft_model=None):
    engine = Engine(model, max_rows or len(rows), max_new, draft_model=draft_model)
    engine.add(rows)
    steps = proposed = accepted = 0
    while engine.rows:
        for row in engine.step():
            assert row.error is None, row.error
            proposed, accepted = proposed + row.drafted[0], accepted + row.drafted[1]
        steps += 1
    return steps, proposed, accepted


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    lookup = PromptLookup()
    assert lookup.propose([5, 6, 7, 8, 1, 2, 3, 9, 1, 2, 3], 3) == [9, 1, 2]  # 3-gram (1, 2, 3): 9 followed it
    assert PromptLookup().propose([1, 2, 3, 4, 7, 3], 2) == [4, 7]  # only the 1-gram matches
    assert PromptLookup().propose([1, 2, 3], 4) == []  # nothing earlier
    assert PromptLookup().propose([4, 4, 4], 5) == [4] * 5  # a copy that reaches the present keeps copying
    grow = PromptLookup()
    assert grow.propose([1, 2, 1], 2) == [2, 1]
    assert grow.propose([1, 2, 1, 2, 9, 1, 2], 2) == [9, 1]  # the index grows with the context


def test_refused_runs_back_the_lookups_off():
    """Where nothing is taken a row skips 1, 2, 4, 8, 16, 16 steps' lookups: few steps pay for extra positions;
    the number proposed follows what is taken."""
    lookup = PromptLookup()
    waits = []
    for _ in range(6):
        lookup.settle(4, 0, 8)
        waits.append(lookup.wait)
    assert waits == [1, 2, 4, 8, 16, 16]
    lookup.settle(3, 2, 8)
    assert lookup.wait == 0 and lookup.misses == 0 and lookup.size == 2  # cut short: one fewer next time
    lookup.settle(2, 2, 8)
    lookup.settle(4, 4, 5)
    assert lookup.size == 5  # taken whole: two more, up to draft_tokens
    model = tiny()  # a flat distribution over 50 tokens: a proposal is mostly refused
    row = Row([7, 3, 7, 5, 7, 9, 7, 11], 40, temperature=1.0, seed=0, draft='ngram', draft_tokens=4)
    engine = Engine(model, 1, 40)
    engine.add([row])
    speculated = []
    while engine.rows:
        engine.step()
        speculated.append(row.drafted)
    refused = [i for i, (p, a) in enumerate(speculated) if p and not a]
    assert refused and all(speculated[i + 1][0] == 0 for i in refused if i + 1 < len(speculated))


@pytest.mark.parametrize('arch', list(ARCHS))
def test_greedy_tokens_are_plain_decodings(arch):
    """100 prompts (most repeating themselves), each with random settings, speculating beside plain rows in
    one engine: every token the same as the row decoded alone without a draft."""
    model, rng = tiny(arch, sharpen=3.0), random.Random(arch)
    proposed = accepted = 0
    for batch in range(25):
        plain, spec = [], []
        for _ in range(4):
            unit = [rng.randrange(50) for _ in range(rng.randint(1, 6))]
            prompt = (unit * 10)[:rng.randint(1, 30)] if rng.random() < 0.8 else [rng.randrange(50) for _ in range(20)]
            settings = dict(temperature=0, max_tokens=rng.randint(1, 30))
            if rng.random() < 0.4:
                settings.update(repetition_penalty=rng.choice([0.8, 1.3]), presence_penalty=rng.uniform(-1, 1),
                                frequency_penalty=rng.uniform(-1, 1))
            if rng.random() < 0.3:
                settings['logit_bias'] = {rng.randrange(50): rng.uniform(-5, 5) for _ in range(3)}
            if rng.random() < 0.3:
                settings['stop_tokens'] = {rng.randrange(50)}
            plain.append(Row(prompt, **settings))
            spec.append(Row(prompt, **settings, draft='ngram', draft_tokens=rng.choice([1, 3, 5, 8]))
                        if rng.random() < 0.75 else Row(prompt, **settings))
        for row in plain:
            run(model, [row])
        _, p, a = run(model, spec)
        proposed, accepted = proposed + p, accepted + a
        for a_row, b_row in zip(plain, spec):
            assert a_row.tokens == b_row.tokens and a_row.finish_reason == b_row.finish_reason
    assert accepted > 100 and accepted < proposed  # it did speculate, and was refused too


def test_fewer_steps_where_the_text_repeats():
    model = tiny(sharpen=3.0)
    prompt = [3, 9, 4, 1, 7] * 6
    plain, spec = Row(prompt, 30, temperature=0), Row(prompt, 30, temperature=0, draft='ngram', draft_tokens=6)
    plain_steps, _, _ = run(model, [plain])
    spec_steps, proposed, accepted = run(model, [spec])
    assert plain.tokens == spec.tokens and plain_steps == 30
    assert spec_steps < plain_steps - accepted / 2 and accepted > 0


def exact_pairs(model, context, vocab, temperature, top_k, top_p, rep, bias):
    """The exact probability of each pair of next tokens under the row's processed distribution."""
    def dist(ids):
        logits = model.logits(model.hidden_states(torch.tensor([ids])))[0, -1:].float()
        counts = torch.bincount(torch.tensor(ids), minlength=vocab).float()[None]
        x = apply_penalties(logits, counts, torch.tensor([[rep]]), torch.zeros(1, 1), torch.zeros(1, 1)) + bias
        return probabilities(x, torch.tensor([temperature]), torch.tensor([top_k]), torch.tensor([top_p]))[0]
    with torch.no_grad():
        first = dist(context)
        return torch.stack([first[a] * dist(context + [a]) for a in range(vocab)])  # (vocab, vocab)


@pytest.mark.parametrize('draft', ['ngram', 'model'])
@pytest.mark.parametrize('settings', [dict(temperature=1.0), dict(temperature=0.7, top_k=4, top_p=0.9,
                                                                 repetition_penalty=1.5, logit_bias={2: 1.5})])
def test_sampled_tokens_keep_the_model_distribution(settings, draft):
    """6000 samples of the next two tokens with the lookup proposing one (taken or refused): their frequencies
    against the exact probabilities, chi-square; the same frequencies fail against a rule that always takes
    the proposal, so the test can tell."""
    vocab, context = 6, [0, 4, 4, 0, 4, 4, 0, 4]  # the lookup proposes 4, which has about even chances
    model = tiny(vocab=vocab, seed=1, sharpen=2.0)
    bias = torch.zeros(vocab)
    for t, v in settings.get('logit_bias', {}).items():
        bias[t] = v
    exact = exact_pairs(model, context, vocab, settings['temperature'], settings.get('top_k', 0),
                        settings.get('top_p', 1.0), settings.get('repetition_penalty', 1.0), bias)
    counts = torch.zeros(vocab, vocab)
    proposed = accepted = 0
    for batch in range(60):
        rows = [Row(context, 2, seed=batch * 100 + i, draft=draft, **settings) for i in range(100)]
        _, p, a = run(model, rows, max_new=2, draft_model=model)  # the model as its own draft proposes its argmax
        proposed, accepted = proposed + p, accepted + a
        for row in rows:
            counts[row.tokens[0], row.tokens[1]] += 1
    assert 0.2 * proposed < accepted < 0.8 * proposed  # both paths ran, often
    n = counts.sum()

    def chi2(p):
        keep = p * n >= 5  # cells with too few expected samples are pooled into one
        expected = torch.cat([p[keep] * n, (p[~keep].sum() * n)[None]])
        observed = torch.cat([counts[keep], counts[~keep].sum()[None]])
        return float(((observed - expected) ** 2 / expected.clamp(min=1e-9)).sum()), int(keep.sum())
    stat, cells = chi2(exact)
    assert stat < cells + 5 * (2 * cells) ** 0.5, (stat, cells)  # far beyond the 0.9999 quantile for this df
    # a wrong rule, redrawing from the whole distribution on a refusal (x not removed), gives 4 more often
    p4 = exact[4].sum()
    wrong = exact * (1 - p4)
    wrong[4] = exact[4] / p4 * (p4 + (1 - p4) * p4)
    stat, cells = chi2(wrong)
    assert stat > 3 * (cells + 5 * (2 * cells) ** 0.5), stat


def untied(model, seed):
    """The model with an output layer of its own: a random model with tied weights only repeats its input."""
    torch.manual_seed(seed)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.3)
    return model


@pytest.mark.parametrize('arch', list(ARCHS))
def test_a_draft_model_changes_no_greedy_token(arch):
    """A smaller model (another architecture, rotary) proposes: the tokens are plain decoding's, some taken;
    the model as its own draft has every proposal taken (without penalties, which the draft does not apply)."""
    model, rng = untied(tiny(arch), 1), random.Random(arch)
    small = untied(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=50, dropout=0.0,
                                 use_rope=True)).eval(), 2)
    proposed = accepted = 0
    for _ in range(8):
        prompt = [rng.randrange(50) for _ in range(rng.randint(1, 20))]
        plain = Row(prompt, 30, temperature=0, repetition_penalty=rng.choice([1.0, 1.3]))
        run(model, [plain])
        for draft_model in (small, model):
            row = Row(prompt, 30, temperature=0, repetition_penalty=plain.penalties[0], draft='model', draft_tokens=3)
            _, p, a = run(model, [row, Row(prompt, 30, temperature=0)], draft_model=draft_model)
            assert row.tokens == plain.tokens
            if draft_model is model and not row.uses_penalties:  # (the draft knows no penalties)
                assert a == p >= 20  # 3 taken a step: 30 tokens in 8 steps
            else:
                proposed, accepted = proposed + p, accepted + a
    assert 0 < accepted < proposed
    with pytest.raises(SettingError, match='no draft model'):
        Engine(model, 1, 8).add([Row([1], 4, draft='model')])


def test_the_cache_keeps_only_accepted_tokens():
    model = tiny('rope', sharpen=3.0)
    row = Row([4, 8, 15, 16, 23, 42] * 3, 24, temperature=0, draft='ngram', draft_tokens=5)
    engine = Engine(model, 1, 24)
    engine.add([row])
    refused = 0
    while engine.rows:
        engine.step()
        refused += row.drafted[0] - row.drafted[1]
        if not engine.rows:
            break
        held = (row.prompt + row.tokens)[:-1]
        assert engine.cache.lengths[0] == len(held)
        fresh = KVCache(model.config, 1, len(held), 'cpu', torch.float32)
        with torch.inference_mode():
            model.hidden_states(torch.tensor([held]), cache=fresh)
        for ours, theirs in zip(engine.cache.k + engine.cache.v, fresh.k + fresh.v):
            assert torch.allclose(ours[0, :, :len(held)], theirs[0], atol=1e-5, rtol=1e-4)
    assert refused > 0  # some proposals were refused and their positions dropped


def test_a_run_ends_at_stop_tokens_pause_tokens_and_max_tokens():
    model = tiny(sharpen=3.0)
    prompt = [3, 9, 4, 1, 7] * 6
    plain = Row(prompt, 30, temperature=0)
    run(model, [plain])
    stop, pause = plain.tokens[7], plain.tokens[3]
    ended = Row(prompt, 30, temperature=0, stop_tokens={stop}, draft='ngram', draft_tokens=8)
    paused = Row(prompt, 12, temperature=0, draft='ngram', draft_tokens=8, logprobs=2)
    paused.pause_tokens.add(pause)
    engine = Engine(model, 2, 40)
    engine.add([ended, paused])
    while engine.rows:
        for row in engine.step():
            if row is paused and pause in row.tokens[len(row.tokens) - row.stepped:]:
                assert row.tokens[-1] == pause  # the caller acts on it before anything follows
    assert ended.tokens == plain.tokens[:plain.tokens.index(stop) + 1] and ended.finish_reason == 'stop'
    assert paused.tokens == plain.tokens[:12] and paused.finish_reason == 'length'
    assert len(paused.token_logprobs) == 12


def test_stop_strings_and_calculator_calls_with_a_draft(caller, bpe):  # noqa: F811
    """Text through generate_text: a stop string inside an accepted run ends the row there (its tokens too),
    and a calculator call's output is forced after the call's end, as without a draft."""
    from textgen import load_model
    from tokenizer import render_chat
    model, tokenizer, _ = load_model('resume', str(caller / 'sft'), 'cpu', 'float32')
    prompt, _ = render_chat(tokenizer, [('user', 'What is 12 * 3?')])
    for stop in ((), ('36',), ('Answer',)):
        outs = []
        for draft in ('', 'ngram'):
            rows = []
            text = ''.join(p for _, p in generate_text(model, tokenizer, [prompt], 30, stop=stop, temperature=0,
                                                       draft=draft, keep=rows))
            outs.append((text, rows[0].tokens, rows[0].sampled))
        assert outs[0] == outs[1], stop
    assert outs[0][0].startswith('<|python_start|>12*3<|python_end|><|output_start|>36')


def test_sample_py_with_a_draft_model(caller, bpe, monkeypatch, capsys):  # noqa: F811
    """sample.py --draft=<out_dir>: a smaller model with the same tokenizer proposes, the reply is the same; a
    draft with another tokenizer is a one-line error."""
    from test_tools import run_main
    from textgen import load_draft
    from tokenizer import tokenizer_from_meta, train_bpe
    args = [f'--out_dir={caller / "sft"}', '--chat=True', '--temperature=0', '--device=cpu', '--max_new_tokens=30']
    reply = lambda *more: run_main(monkeypatch, capsys, 'sample.py', *args, *more, stdin='What is 12 * 3?\n').split('> ')[1]  # noqa: E731
    plain = reply()
    assert plain.startswith('<|python_start|>12*3<|python_end|><|output_start|>36')
    for draft in ('ngram', caller / 'random', caller / 'sft'):
        assert reply(f'--draft={draft}') == plain
    other = tokenizer_from_meta(train_bpe(["something else entirely, 12345\n" * 20], 280))
    with pytest.raises(ValueError, match='another tokenizer'):
        load_draft(str(caller / 'random'), other)


def test_a_stop_string_inside_an_accepted_run(bpe):  # noqa: F811
    model = tiny(vocab=bpe.n_vocab, sharpen=3.0)
    prompt = bpe.encode('Multiply 4821 by 397: 1913937. ' * 4)
    plain = []
    text = ''.join(p for _, p in generate_text(model, bpe, [prompt], 24, temperature=0, keep=plain))
    assert len(plain[0].tokens) == 24
    stop = bpe.decode(plain[0].tokens[10:12])  # a stop string mid-way, spanning two tokens
    kept = []
    for draft in ('', 'ngram'):
        rows = []
        out = ''.join(p for _, p in generate_text(model, bpe, [prompt], 24, stop=stop, temperature=0, draft=draft,
                                                  keep=rows))
        assert out == text[:text.index(stop)] and rows[0].finish_reason == 'stop'
        assert rows[0].tokens == plain[0].tokens[:len(rows[0].tokens)] and len(rows[0].tokens) <= 12
        kept.append((rows[0].tokens, rows[0].sampled))
    assert kept[0] == kept[1]


def test_draft_is_refused_with_grammars_and_beams_and_checked():
    class Anything:
        done = False

        def fill_bitmask(self, words):
            words[:] = -1

        def advance(self, token):
            pass
    with pytest.raises(SettingError) as e:
        Row([1, 2], 4, draft='ngram', constraint=Anything())
    assert e.value.name == 'draft' and 'response_format' in str(e.value)
    with pytest.raises(SettingError, match='beam'):
        beam_rows([1, 2], 2, 4, draft='ngram')
    for bad in (dict(draft='out-small'), dict(draft='ngram', draft_tokens=0), dict(draft='ngram', draft_tokens=True)):
        with pytest.raises(SettingError):
            Row([1, 2], 4, **bad)


def test_a_server_default_draft_goes_where_it_applies(bpe):  # noqa: F811
    """serve.py's draft is the default of requests that name none; a beam search leaves it out, and refuses
    one it is given by name."""
    from serving.api import APIError, read_request
    default = dict(draft='ngram', draft_tokens=3)
    ask = lambda **body: read_request(dict(max_tokens=4, **body), [[1, 2]], bpe, 16, False, 8, 100, draft=default)  # noqa: E731
    rows, _ = ask()
    assert (rows[0][0].draft, rows[0][0].draft_tokens) == ('ngram', 3)
    rows, _ = ask(draft='', temperature=0)
    assert rows[0][0].draft == ''
    rows, how = ask(temperature=0, best_of=2)
    assert how['beams'] and not any(r.draft for r in rows[0])
    with pytest.raises(APIError) as e:
        ask(temperature=0, best_of=2, draft='ngram')
    assert 'best_of' in str(e.value) and 'draft' in str(e.value)
    with pytest.raises(APIError, match='draft'):
        ask(draft='out-small')


def test_a_draft_model_fault_fails_its_row_only():
    model, broken = tiny(), tiny(seed=1)

    def fault(idx, cache=None):
        raise RuntimeError("draft fault")
    broken.hidden_states = fault
    plain = Row([1, 2, 3], 10, temperature=0)
    run(model, [plain])
    rows = [Row([1, 2, 3], 10, temperature=0, draft='model'), Row([1, 2, 3], 10, temperature=0)]
    engine = Engine(model, 2, 20, draft_model=broken)
    engine.add(rows)
    while engine.rows:
        engine.step()
    assert rows[0].finish_reason == 'error' and 'draft fault' in str(rows[0].error)
    assert rows[1].finish_reason == 'length' and rows[1].tokens == plain.tokens
