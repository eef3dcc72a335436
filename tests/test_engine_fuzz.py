"""
The engine under seeded random sequences of operations: rows join (random prompts, n samples,
every sampling setting, bad ids), steps run, the caller forces tokens on a row (as a calculator
feeds its output), rows end at any moment (first, middle, last slot), faults strike (a poison token fails any row that feeds it), the model is replaced. After each
operation the invariants hold (speculating rows, draft='ngram', among the others): nothing escapes, every row ends exactly once with a reason that
fits it, the cache holds exactly each row's context (a speculative step's rejected proposals gone), and
a seeded or greedy row gets the tokens it gets alone (a greedy speculating row: those plain decoding gets).

The suite runs a few seconds of it. A longer run by hand:
$ ENGINE_FUZZ_OPS=40000 ENGINE_FUZZ_SEED=2 python -m pytest -q tests/test_engine_fuzz.py
"""
import os
import random

import pytest
import torch

from engine import Engine, Row, SettingError, beam_rows
from engine import KVCache
from model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures('one_thread')

OPS = int(os.environ.get('ENGINE_FUZZ_OPS', 400))  # per architecture
SEED = os.environ.get('ENGINE_FUZZ_SEED', '')
VOCAB, TOKENIZER_VOCAB, BLOCK = 40, 38, 16  # ids 38 and 39 are padding: never sampled
POISON = 37  # a row that feeds this token faults in the model (its prefill, or the step after it is sampled)
MAX_ROWS, MAX_NEW = 4, 24
CHUNK = 4  # prefill chunk: small, so that the prefix cache has whole chunks to reuse in these short prompts
ARCHS = {'learned': {}, 'rope': dict(use_rope=True), 'alibi': dict(use_alibi=True)}


def make_model(arch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=BLOCK, vocab_size=VOCAB, dropout=0.0,
                          **ARCHS[arch])).eval()
    clean = model.hidden_states

    def faulty(idx, cache=None):
        # the prefill sees the prompt but its last token; a step sees each row's newest token
        if (idx == POISON).any():
            raise RuntimeError("poison")
        return clean(idx, cache)
    model.hidden_states = faulty
    return model, clean


class Constraint:
    """A stand-in for a grammar: only `allowed` ids may come next, and it is complete after `length` of them.
    An empty set allows nothing (the row fails); fault=True raises when it is advanced (so does the row);
    fail_at=k raises when the mask is asked for after k tokens, as a grammar engine that gives up mid-row."""

    def __init__(self, allowed, length, fault=False, fail_at=None):
        self.allowed, self.length, self.fault, self.fail_at, self.taken = allowed, length, fault, fail_at, []

    def fill_bitmask(self, words):
        if self.fail_at is not None and len(self.taken) >= self.fail_at:
            raise ValueError("the grammar failed mid-row")
        words[:] = 0
        for t in self.allowed:
            words[t // 32] |= 1 << (t % 32)

    def advance(self, token):
        assert token in self.allowed, f"{token} was sampled against the grammar {self.allowed}"
        self.taken.append(token)
        if self.fault:
            raise RuntimeError("grammar fault")

    @property
    def done(self):
        return len(self.taken) >= self.length

    def fresh(self):
        return Constraint(self.allowed, self.length, self.fault, self.fail_at)


class StopPair:
    """A stand-in for a stop string (the engine sees only ids): two given tokens in a row end a beam; its key
    is the sequence before them."""

    def __init__(self, a, b):
        self.pair = [a, b]

    def __call__(self, tokens):
        for i in range(len(tokens) - 1):
            if tokens[i:i + 2] == self.pair:
                return tuple(tokens[:i])
        return None


SPEC = random.Random()  # the speculating rows' own choices (seeded by the test), apart from the operations'


def random_row(rng, max_tokens=None):
    prompt = [rng.randrange(TOKENIZER_VOCAB) for _ in range(rng.choice([1, 2, 5, 12, 20]))]
    if rng.random() < 0.7:  # mostly keep the poison out of prompts, or almost every row would fail at once
        prompt = [t if t != POISON else 0 for t in prompt]
    settings = dict(temperature=rng.choice([0, 1e-6, 0.5, 1.0, 2.0]), top_k=rng.choice([0, 1, 3, 50]),
                    top_p=rng.choice([1.0, 0.9, 0.3]), seed=rng.choice([None, rng.randrange(1000)]),
                    logprobs=rng.choice([None, None, 0, 3]))
    if rng.random() < 0.3:
        settings.update(repetition_penalty=rng.choice([0.5, 1.3, 3.0]), presence_penalty=rng.uniform(-2, 2),
                        frequency_penalty=rng.uniform(-2, 2))
    if rng.random() < 0.3:
        settings['logit_bias'] = {rng.randrange(TOKENIZER_VOCAB): rng.uniform(-100, 100) for _ in range(rng.randint(1, 4))}
    if rng.random() < 0.3:
        settings['stop_tokens'] = {rng.randrange(TOKENIZER_VOCAB) for _ in range(2)}
    if rng.random() < 0.2:
        allowed = set() if rng.random() < 0.1 else set(rng.sample(range(TOKENIZER_VOCAB), rng.randint(1, 6)))
        settings['constraint'] = Constraint(allowed, rng.randint(1, MAX_NEW), fault=rng.random() < 0.1,
                                            fail_at=rng.choice([None, None, 0, 1, 3]))
    elif SPEC.random() < 0.35:  # speculative decoding: a prompt that repeats itself gives the lookup something
        settings.update(draft='ngram', draft_tokens=SPEC.choice([1, 2, 4, 8]))
        settings['temperature'] = SPEC.choice([0, settings['temperature']])  # greedy rows take most proposals
        prompt = (prompt[:SPEC.randint(1, 3)] * 8)[:SPEC.randint(2, 8)]
    return Row(prompt, max_tokens or rng.randint(1, MAX_NEW), **settings)


def copy_of(row, max_tokens):
    """The row afresh, without its draft: a greedy speculating row gets what plain decoding gets."""
    return Row(row.prompt, max_tokens, temperature=row.temperature, top_k=row.top_k, top_p=row.top_p,
               repetition_penalty=row.penalties[0], presence_penalty=row.penalties[1],
               frequency_penalty=row.penalties[2], logit_bias=row.logit_bias, seed=row.seed,
               stop_tokens=row.stop_tokens, logprobs=row.logprobs, constraint=row.constraint and row.constraint.fresh())


def alone(model, row):
    """The row's tokens when it is the engine's only row (to where the row ended, if it was ended early), the
    tokens it was forced to take forced at the same places."""
    forced = {i: t for i, (t, sampled) in enumerate(zip(row.tokens, row.sampled)) if not sampled}
    by_engine = row.finish_reason in ('length', 'error') or row.tokens[-1] in row.stop_tokens or (
        row.constraint is not None and row.constraint.done)
    copy = copy_of(row, row.max_tokens if by_engine else len(row.tokens))
    engine = Engine(model, 1, MAX_NEW, vocab_size=TOKENIZER_VOCAB, prefill_chunk=CHUNK)
    engine.add([copy])
    while engine.rows:
        if len(copy.tokens) in forced:
            copy.forced.append(forced[len(copy.tokens)])
        engine.step()
    return copy


def check_cache(engine, clean):
    """Each live row's cache holds the keys and values of its context (everything but the token the
    next step feeds) as a fresh forward computes them, at the length that context has."""
    cfg = engine.model.config
    for slot, row in enumerate(engine.rows):
        seq = row.prompt[-engine.window:] + row.tokens
        assert row.next_token == seq[-1]
        n = engine.cache.lengths[slot]
        if cfg.learned_positions and len(seq) - 1 > engine.cache.max_len - 1:
            assert engine.cache.max_len - 1 <= n <= engine.cache.max_len  # slid: the last block's worth
        else:
            assert n == len(seq) - 1
        context = seq[:-1][len(seq) - 1 - n:]
        if not context:
            continue
        fresh = KVCache(cfg, 1, n, engine.device, engine.cache.k[0].dtype)
        with torch.inference_mode():
            clean(torch.tensor([context]), cache=fresh)
        for ours, theirs in zip(engine.cache.k + engine.cache.v, fresh.k + fresh.v):
            assert torch.allclose(ours[slot, :, :n], theirs[0], atol=1e-5, rtol=1e-4), f"slot {slot}: the cache is not its row's"


def check_row(row):
    """A row that has ended: its reason fits what happened, and it never changes. True the first time."""
    if hasattr(row, 'ended_as'):
        assert row.finish_reason == row.ended_as, "a row's finish_reason changed after it ended"
        return False
    row.ended_as = row.finish_reason
    assert len(row.tokens) <= row.max_tokens and all(0 <= t < TOKENIZER_VOCAB for t in row.tokens)
    if row.logprobs is not None and row.beam is None:  # a forced token has no logprobs entry
        assert len(row.token_logprobs) == sum(row.sampled) and len(row.sampled) == len(row.tokens)
    if row.constraint is not None:
        assert set(row.tokens) <= row.constraint.allowed
    if row.finish_reason == 'error':
        assert row.error is not None
    elif row.finish_reason == 'length':
        assert row.error is None and len(row.tokens) == row.max_tokens
    elif row.finish_reason == 'stop' and row.tokens and row.tokens[-1] in row.stop_tokens:
        assert row.error is None
    return True


@pytest.mark.parametrize('arch', list(ARCHS))
def test_random_operations_keep_the_engine_consistent(arch):
    rng = random.Random(f'fuzz-{arch}{SEED}')
    SPEC.seed(f'speculate-{arch}{SEED}')
    model, clean = make_model(arch)
    def new_engine(prefix_cache_tokens):
        return Engine(model, MAX_ROWS, MAX_NEW, vocab_size=TOKENIZER_VOCAB, seed=rng.randrange(100),
                      prefix_cache_tokens=prefix_cache_tokens, prefill_chunk=CHUNK)
    engine = new_engine(400)
    live, seen, compared = [], [], 0
    counts = dict(add=0, refused=0, step=0, finish=0, reload=0, ended=0, cached=0, beams=0, forced=0, proposed=0, accepted=0)

    def ended(rows):
        nonlocal compared
        for row in rows:
            if check_row(row):
                counts['ended'] += 1
                seen.append(row)
                if row.beam is not None:
                    beam_ended(row.beam)
                    continue
                # a row with its own random stream, or a greedy one, samples as it would alone
                # (a sampled speculating row draws differently: how far it looks ahead depends on the other rows)
                if (row.seed is not None and not row.draft or row.temperature == 0) and row.tokens and compared < OPS // 4:
                    compared += 1
                    solo = alone(model, row)
                    assert solo.tokens == row.tokens, (arch, row.finish_reason, solo.finish_reason)
                    assert (solo.error is None) == (row.error is None)
                    if row.logprobs is not None:
                        for (a, top_a), (b, top_b) in zip(solo.token_logprobs, row.token_logprobs):
                            assert abs(a - b) < 1e-4 and [t for t, _ in top_a] == [t for t, _ in top_b]

    def beam_ended(group):
        """A beam search that ends of itself ends all its rows in one step, each as the same search alone."""
        nonlocal compared
        reasons = [r.finish_reason for r in group.rows]
        by_caller = any(getattr(r, 'ended_by_caller', False) for r in group.rows)
        if any(reason in ('stop', 'length') for reason in reasons) and not by_caller and not hasattr(group, 'checked'):
            group.checked = True
            assert all(reason in ('stop', 'length') for reason in reasons) and not set(group.rows) & set(engine.rows), reasons
            solo = beam_rows(group.rows[0].prompt, len(group.rows), group.max_tokens, group.stop_tokens, group.stops,
                             **group.settings)
            alone_engine = Engine(model, len(solo), MAX_NEW, vocab_size=TOKENIZER_VOCAB, prefill_chunk=CHUNK)
            alone_engine.add(solo)
            while alone_engine.rows:
                alone_engine.step()
            assert [r.tokens for r in solo] == [r.tokens for r in group.rows]
            compared += 1
            counts['beams'] += 1

    for _ in range(OPS):
        op = rng.choices(['add', 'beam', 'bad', 'step', 'finish', 'reload', 'score', 'force'],
                         [3, 0.8, 0.3, 6, 1.5, 0.1, 0.2, 0.8])[0]
        free = MAX_ROWS - len(engine.rows)
        if op == 'add' and free:
            rows = [random_row(rng) for _ in range(rng.randint(1, free))]
            for row in rows:  # like a chat resending its history: a prompt that continues an earlier sequence
                if seen and rng.random() < 0.5:
                    earlier = rng.choice(seen)
                    row.prompt = (earlier.prompt + earlier.tokens)[-BLOCK:] + row.prompt[:rng.randint(1, 3)]
            if len(rows) > 1 and rng.random() < 0.4:  # n samples of one prompt share its prefill
                rows = [Row(rows[0].prompt, r.max_tokens, temperature=r.temperature, seed=r.seed,
                            logit_bias=r.logit_bias, logprobs=r.logprobs) for r in rows]
            before = list(engine.rows)
            try:
                engine.add(rows)
                live += rows
                counts['add'] += 1
                counts['cached'] += sum(row.cached_tokens > 0 for row in rows)
            except RuntimeError as e:  # a poisoned prompt: none of them joined
                assert 'poison' in str(e) and engine.rows == before
                counts['refused'] += 1
        elif op == 'beam' and free >= 2:
            row = random_row(rng)
            settings = {}  # penalties and logit_bias act on the beams' log probabilities; a stop "string" ends one
            if rng.random() < 0.4:
                settings.update(repetition_penalty=rng.choice([0.5, 1.3, 3.0]), presence_penalty=rng.uniform(-2, 2),
                                frequency_penalty=rng.uniform(-2, 2))
            if rng.random() < 0.4:
                settings['logit_bias'] = {rng.randrange(TOKENIZER_VOCAB): rng.uniform(-100, 100) for _ in range(3)}
            stops = StopPair(rng.randrange(TOKENIZER_VOCAB), rng.randrange(TOKENIZER_VOCAB)) if rng.random() < 0.5 else None
            rows = beam_rows(row.prompt, rng.randint(2, free), row.max_tokens, row.stop_tokens, stops, **settings)
            rows[0].beam.settings = settings
            try:
                engine.add(rows)
                live += rows
            except RuntimeError as e:
                assert 'poison' in str(e)
        elif op == 'bad':
            row = random_row(rng)
            kind = rng.choice(['id', 'bias', 'length', 'too many'])
            if kind == 'id':
                row.prompt[rng.randrange(len(row.prompt))] = rng.choice([TOKENIZER_VOCAB, VOCAB, -1, 10 ** 12])
            elif kind == 'bias':
                row.logit_bias[TOKENIZER_VOCAB] = 1.0
            elif kind == 'length':
                row.max_tokens = rng.choice([0, MAX_NEW + 1])
            before = list(engine.rows)
            with pytest.raises((SettingError, RuntimeError)):
                engine.add([row] * (MAX_ROWS + 1) if kind == 'too many' else [row])
            assert engine.rows == before
            counts['refused'] += 1
        elif op == 'step':
            touched = engine.step()
            counts['step'] += 1
            counts['proposed'] += sum(r.drafted[0] for r in touched)
            counts['accepted'] += sum(r.drafted[1] for r in touched)
            assert {id(r) for r in touched} <= {id(r) for r in live}
            ended([r for r in touched if r.finish_reason is not None])
        elif op == 'finish' and engine.rows:
            row = rng.choice([engine.rows[0], engine.rows[-1], rng.choice(engine.rows)])
            engine.finish(row, rng.choice(['stop', 'cancelled']))  # a stop string, a client gone
            row.ended_by_caller = True
            engine.finish(row, 'twice')  # a second end changes nothing
            counts['finish'] += 1
            ended([row])
        elif op == 'force' and any(r.beam is None and r.constraint is None for r in engine.rows):
            # a tool's output, queued between steps (a grammar-constrained row never calls a tool)
            row = rng.choice([r for r in engine.rows if r.beam is None and r.constraint is None])
            row.forced.extend(rng.randrange(TOKENIZER_VOCAB) for _ in range(rng.randint(1, 3)))
            counts['forced'] += 1
        elif op == 'reload':  # a new model: what ran ends, a new engine starts (as serve.py's worker does)
            for row in list(engine.rows):
                engine.finish(row, 'model_replaced')
            ended(live)
            engine = new_engine(rng.choice([0, 40, 400]))  # a small prefix cache evicts all the time
            counts['reload'] += 1
        elif op == 'score':
            prompt = random_row(rng).prompt
            if POISON in prompt[-engine.window:]:  # (a prompt is cropped to its last window tokens)
                with pytest.raises(RuntimeError):
                    engine.prompt_logprobs(prompt, 2)
            else:
                entries = engine.prompt_logprobs(prompt, 2)
                assert len(entries) == len(prompt) and entries[0] is None
        # the invariants, after every operation
        assert len({id(r) for r in engine.rows}) == len(engine.rows) <= MAX_ROWS
        assert all(r.finish_reason is None for r in engine.rows)
        assert all(r.finish_reason is not None for r in live if r not in engine.rows)
        live = [r for r in live if r.finish_reason is None]
        check_cache(engine, clean)
    while engine.rows:
        ended([r for r in engine.step() if r.finish_reason is not None])
    assert not live or all(r.finish_reason is not None for r in live)
    assert counts['step'] > OPS // 3 and counts['ended'] > OPS // 20 and compared > 10 and counts['cached'] and counts['beams'] and counts['forced'] \
        and counts["accepted"], counts
