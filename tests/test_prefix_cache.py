"""
The engine's prefix cache: a prompt that starts with tokens a running or remembered row holds
reuses their keys and values (whole prefill chunks), and every row gets exactly the tokens it
gets without the cache (greedy and seeded sampling; learned positions, RoPE, ALiBi; a window that
slid); the cache stays within its token budget, least recently used out first.
"""
import random

import pytest
import torch

from engine import Engine, Row
from model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures('one_thread')


def make_model(**switches):
    torch.manual_seed(0)
    config = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=40, dropout=0.0)
    return GPT(GPTConfig(**dict(config, **switches))).eval()


CHUNK = 4  # prefill chunks of 4 tokens: the test prompts hold several


def alone(model, prompt, max_tokens, **settings):
    """The tokens a row gets in an engine of its own, without a prefix cache."""
    engine = Engine(model, 1, 40, prefill_chunk=CHUNK)
    row = Row(prompt, max_tokens, **settings)
    engine.add([row])
    while engine.rows:
        engine.step()
    return row.tokens


@pytest.mark.parametrize('switches', [dict(use_rope=True, block_size=128), dict(use_alibi=True, block_size=128),
                                      dict(block_size=32)])
def test_a_chat_reuses_its_history_and_gets_the_same_tokens(switches):
    """Each turn resends the history: the last turn's prompt, in whole chunks, comes from the cache.
    With learned positions and a window of 32 the history outgrows it: the prompt is cropped, the
    window slides while it decodes, and no position from before a slide may be reused."""
    model = make_model(**switches)
    engine = Engine(model, 2, 40, prefix_cache_tokens=200, prefill_chunk=CHUNK)
    rng, history, reused, computed = random.Random(0), [1, 2, 3, 4, 5, 6, 7, 8, 9], [], [0]
    for turn in range(7):
        settings = dict(temperature=0) if turn % 2 else dict(temperature=1.0, top_k=10, seed=turn)
        row = Row(history, 14, **settings)
        engine.add([row])
        while engine.rows:
            engine.step()
        assert row.tokens == alone(model, history, 14, **settings), turn
        reused.append(row.cached_tokens)
        computed.append((len(history) - 1) // CHUNK * CHUNK)  # the prompt's whole prefill chunks
        history = history + row.tokens + [rng.randrange(40) for _ in range(3)]
    if switches['block_size'] == 128:
        assert reused == computed[:-1]
    else:  # the second turn fits the window; later ones are cropped, so their positions all moved
        assert reused[:2] == [0, 8] and max(reused[2:]) == 0


def test_a_running_row_shares_its_prefix():
    model = make_model()
    engine = Engine(model, 3, 40, prefix_cache_tokens=100, prefill_chunk=CHUNK)
    first = Row([5, 6, 7, 8, 9, 10, 11, 12, 13, 14], 20, temperature=0.8, seed=1)
    engine.add([first])
    for _ in range(4):
        engine.step()
    late = Row([5, 6, 7, 8, 9, 10, 11, 12, 15, 16], 10, temperature=0.8, seed=2)
    engine.add([late])
    assert late.cached_tokens == 8  # the running row's first two chunks
    while engine.rows:
        engine.step()
    assert late.tokens == alone(model, late.prompt, 10, temperature=0.8, seed=2)
    assert first.tokens == alone(model, first.prompt, 20, temperature=0.8, seed=1)


@pytest.mark.parametrize('switches', [{}, dict(use_rope=True)])
def test_random_operations_keep_outputs_and_the_budget(switches):
    """Seeded random joins, steps and early ends over prompts that share starts, under a budget
    smaller than what ends: every row's tokens are those it gets alone, the cache never holds
    more than its budget, and what it holds is in least-recently-used order."""
    model = make_model(**switches)
    budget = 30
    engine = Engine(model, 3, 12, prefix_cache_tokens=budget, prefill_chunk=CHUNK)
    rng = random.Random(1)
    stems = [[rng.randrange(40) for _ in range(rng.randrange(2, 12))] for _ in range(4)]
    ended, reused = [], 0
    for _ in range(60):
        op = rng.random()
        if op < 0.3 and len(engine.rows) < 3:
            prompt = rng.choice(stems)[:rng.randrange(1, 12)] + [rng.randrange(40) for _ in range(rng.randrange(3))]
            settings = rng.choice([dict(temperature=0), dict(temperature=1.0, seed=rng.randrange(100))])
            row = Row(prompt or [1], rng.randrange(1, 12), **settings)
            row.settings = settings
            engine.add([row])
            reused += row.cached_tokens
            ended.append(row)
        elif op < 0.4 and engine.rows:
            engine.finish(rng.choice(engine.rows), 'cancelled')
        elif engine.rows:
            engine.step()
        assert engine.prefix_tokens_held() <= budget
        for tokens, kv in engine.prefix.saved.items():
            assert kv.shape[3] == len(tokens) > 0
    while engine.rows:
        engine.step()
    assert reused > 20 and len(ended) > 10
    for row in ended:  # a row ended early is a prefix of what it gets alone
        full = alone(model, row.prompt, row.max_tokens, **row.settings)
        assert row.tokens == full[:len(row.tokens)]


def test_eviction_is_least_recently_used():
    model = make_model()
    engine = Engine(model, 1, 10, prefix_cache_tokens=10, prefill_chunk=1)

    def run(prompt):  # chunks of one token: the cache then holds all of the prompt but its last
        row = Row(prompt, 1, temperature=0)
        engine.add([row])
        while engine.rows:
            engine.step()
        return row.cached_tokens
    run([1, 2, 3, 4, 5, 6])
    run([7, 8, 9, 10, 11, 12])
    assert engine.prefix_tokens_held() == 10
    assert run([1, 2, 3, 20, 21]) == 3  # touches [1..5]: [7..11] is now the oldest, and goes to make room
    assert list(engine.prefix.saved) == [(1, 2, 3, 4, 5), (1, 2, 3, 20)]
    assert run([7, 8, 9, 10, 11, 12]) == 0
    assert list(engine.prefix.saved) == [(1, 2, 3, 20), (7, 8, 9, 10, 11)]
    assert run([7, 8, 9, 10]) == 3 and len(engine.prefix.saved) == 2  # held already, in a longer one
    assert run([7, 8, 9, 10, 11, 12, 13]) == 5 and list(engine.prefix.saved)[-1] == (7, 8, 9, 10, 11, 12)  # supersedes
    assert engine.prefix_tokens_held() == 10
    # a sequence longer than the budget keeps its start
    assert run(list(range(20, 40))) == 0 and list(engine.prefix.saved) == [tuple(range(20, 30))]
    assert run(list(range(20, 36))) == 10
    # the off switch: nothing is kept
    off = Engine(model, 1, 10)
    row = Row([1, 2, 3, 4], 2)
    off.add([row])
    while off.rows:
        off.step()
    assert not off.prefix and row.cached_tokens == 0
