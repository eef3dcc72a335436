"""
Sampling: the KV-cache decode loop gives the uncached forward's logits at every step (past
block_size too), greedy decoding matches transformers' GPT-2 on the same weights, a batch row
decodes as it would alone, and the sampler's knobs (top_p, repetition penalty, stop sequences,
seeds, streaming) do what they say. Then sample.py (plain and interactive) and bench.py run as
a user would run them, on a tiny checkpoint trained here.
"""
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, run_script
import engine as engine_module
from engine import generate
from sampling import apply_penalties, sample_tokens
from engine import KVCache
from model import GPT, GPTConfig
from common import set_threads
from textgen import TextStream, generate_text
from tokenizer import char_tokenizer, gpt2_tokenizer

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=40, dropout=0.0)
TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n" * 60
CHARS = sorted(set(TEXT))
META = {'vocab_size': len(CHARS), 'stoi': {c: i for i, c in enumerate(CHARS)}, 'itos': dict(enumerate(CHARS))}


# tiny models gain nothing from a second thread, and on a busy machine every parallel op can
# stall waiting for it: these tests and the scripts they start run on one
ONE_THREAD = {'OMP_NUM_THREADS': '1'}


pytestmark = pytest.mark.usefixtures('one_thread')


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**dict(TINY, **overrides))).eval()


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# -----------------------------------------------------------------------------
# the decode loop against the uncached forward

@pytest.mark.parametrize('lengths', [(3, 11, 21), (7, 7, 7)], ids=['ragged', 'same_length'])
@pytest.mark.parametrize('switch', [{}, {'use_rope': True}], ids=['learned', 'rope'])
def test_cached_logits_match_uncached_every_step(monkeypatch, switch, lengths):
    """Drive the engine with forced tokens and catch the logits it samples from: at every step
    they are the uncached forward's over the sequence so far, cropped to the last block_size
    (16) tokens as nanoGPT's loop crops (learned positions; rotary ones crop only the prompt).
    Rows of different lengths (one longer than block_size) write the cache row by row; rows of
    one length are prefilled together and written as a slice. All cross block_size."""
    model = make_model(**switch)
    bs = model.config.block_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(40, (n,), generator=g).tolist() for n in lengths]
    n_new = 2 * bs
    forced = torch.randint(40, (len(prompts), n_new), generator=g)
    seen = []

    def fake_sampler(logits, *args):
        seen.append(logits.clone())
        return forced[:, len(seen) - 1]
    monkeypatch.setattr(engine_module, 'sample_tokens', fake_sampler)
    out = generate(model, prompts, n_new)
    assert out == forced.tolist() and len(seen) == n_new
    with torch.no_grad():
        for step, logits in enumerate(seen):
            for row, prompt in enumerate(prompts):
                seq = torch.tensor([prompt[-bs:] + forced[row, :step].tolist()])
                if model.config.learned_positions:
                    seq = seq[:, -bs:]
                reference = model(seq)[0][0, -1]
                assert relative_error(logits[row], reference) <= 1e-4, (step, row)


def test_chunk_after_cached_tokens():
    """Several tokens fed after cached ones (rows of one length) need the position mask."""
    model = make_model()
    idx = torch.randint(40, (3, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = KVCache(model.config, 3, 12, 'cpu', torch.float32)
        model(idx[:, :4], cache=cache)
        chunk = model(idx[:, 4:12], cache=cache)[0][:, -1]
        assert relative_error(chunk, model(idx)[0][:, -1]) <= 1e-4


def test_greedy_matches_transformers(tmp_path):
    """GPT.from_pretrained on a transformers save_pretrained directory, then greedy decoding
    (one row, and a batch of same-length prompts prefilled together) gives transformers'
    greedy token ids."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    vocab = 120
    # no end-of-text token: transformers then generates all max_new_tokens, as ours does
    hf_config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2, initializer_range=0.1,
                           bos_token_id=None, eos_token_id=None, pad_token_id=0)
    GPT2LMHeadModel(hf_config).save_pretrained(tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    prompts = torch.randint(vocab - 1, (3, 7), generator=torch.Generator().manual_seed(3))
    for idx in (prompts[:1], prompts):
        with torch.no_grad():
            theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=40)
        ours_new = torch.tensor(generate(ours, idx.tolist(), 40, temperature=0))
        assert torch.equal(torch.cat([idx, ours_new], 1), theirs)


def test_batch_rows_of_different_lengths_equal_each_row_alone():
    model = make_model(seed=3)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(40, (n,), generator=g).tolist() for n in (1, 6, 13, 20)]
    batched = generate(model, prompts, 30, temperature=0)
    for row, prompt in enumerate(prompts):
        assert batched[row] == generate(model, [prompt], 30, temperature=0)[0], row


# -----------------------------------------------------------------------------
# the sampler's knobs, on crafted logits

def draws(logits, n=4000, temperature=1.0, top_k=None, top_p=1.0):
    """n samples from one row of logits (drawn as n rows at once), as a count per token."""
    setting = lambda value, dtype: torch.full((n,), value, dtype=dtype)  # noqa: E731
    uniform = torch.rand(n, generator=torch.Generator().manual_seed(0))
    tokens = sample_tokens(logits.expand(n, -1), setting(temperature, torch.float), setting(top_k or 0, torch.long),
                           setting(top_p, torch.float), uniform)
    return torch.bincount(tokens, minlength=logits.size(-1))


def test_top_p_samples_only_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.02, 0.3, 0.1, 0.03])
    logits = probs.log()[None]
    # ranked: 0.5, 0.3 (together 0.8 >= 0.75), then the rest is outside the nucleus
    for top_k in (None, 4):  # over the whole vocabulary, and within the top_k tokens
        counts = draws(logits, top_p=0.75, top_k=top_k)
        assert set(counts.nonzero()[:, 0].tolist()) == {1, 3}
        assert abs(counts[1] / counts.sum() - 0.5 / 0.8) < 0.04  # renormalised within the nucleus
        assert draws(logits, top_p=1e-6, top_k=top_k).tolist() == [0, 4000, 0, 0, 0, 0]  # tiny top_p is greedy
    # a big vocabulary, top_k and top_p together: distinct logits (the top_k tokens alone are
    # sampled) and tied ones (every token tied with the k-th stays in)
    for rest in (-10.0 - 0.001 * torch.arange(1000.0), torch.full((1000,), -10.0)):
        big = rest[None].clone()
        big[0, [7, 70, 700]] = torch.tensor([3.0, 2.5, 2.0])
        counts = draws(big, top_k=50, top_p=0.6)
        assert set(counts.nonzero()[:, 0].tolist()) == {7, 70}


def test_top_k_keeps_the_k_most_likely_and_ties():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]])
    assert set(draws(logits, top_k=2).nonzero()[:, 0].tolist()) == {1, 2}
    assert draws(logits, top_k=1).tolist() == [0, 4000, 0, 0, 0]
    # a tie at the k-th place keeps every tied token (as masking logits below the k-th does)
    tied = torch.tensor([[1.0, 3.0, 2.0, 2.0, 2.0]])
    assert set(draws(tied, top_k=2).nonzero()[:, 0].tolist()) == {1, 2, 3, 4}
    # the same in a big vocabulary, where the candidates (twice top_k) hold the whole tie run,
    # and where the run goes past them
    for run in (3, 20):
        big = -10.0 - 0.001 * torch.arange(1000.0)[None]
        big[0, 500:500 + run] = 2.0
        big[0, [7, 70, 700]] = 3.0
        assert set(draws(big, top_k=4).nonzero()[:, 0].tolist()) == {7, 70, 700, *range(500, 500 + run)}
    # temperature sharpens within the kept tokens
    cold, warm = draws(logits, top_k=3, temperature=0.3), draws(logits, top_k=3, temperature=3.0)
    assert cold[1] > warm[1] and cold[3] < warm[3]


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    counts = torch.tensor([[1.0, 2.0, 0.0, 0.0]])
    one = lambda v: torch.tensor([[v]])  # noqa: E731
    out = apply_penalties(logits, counts, one(2.0), one(0.0), one(0.0))
    # a seen positive logit is divided, a seen negative one multiplied; unseen ones stay
    assert out.tolist() == [[1.0, -2.0, 0.5, 1.0]]
    p_before, p_after = logits.softmax(-1), out.softmax(-1)
    assert p_after[0, 0] < p_before[0, 0] and p_after[0, 1] < p_before[0, 1]
    assert p_after[0, 2] > p_before[0, 2]
    # < 1 encourages repeats instead; presence and frequency subtract per seen token / occurrence
    assert apply_penalties(logits, counts, one(0.5), one(0.0), one(0.0)).tolist() == [[4.0, -0.5, 0.5, 1.0]]
    assert apply_penalties(logits, counts, one(1.0), one(0.5), one(0.25)).tolist() == [[1.25, -2.0, 0.5, 1.0]]
    # through the engine: the prompt and every new token count, step by step
    model = make_model(seed=5)
    prompt = [1, 2, 3]
    ours = generate(model, [prompt], 30, temperature=0, repetition_penalty=1.5)[0]
    idx, counts = torch.tensor([prompt]), torch.zeros(1, 40)
    counts[0, prompt] += 1
    with torch.no_grad():
        for _ in range(30):
            logits = apply_penalties(model(idx[:, -16:])[0][:, -1], counts, one(1.5), one(0.0), one(0.0))
            nxt = logits.argmax(-1)
            counts[0, nxt] += 1
            idx = torch.cat([idx, nxt[:, None]], 1)
    assert ours == idx[0, 3:].tolist()
    plain = generate(model, [prompt], 30, temperature=0)[0]
    assert len(set(ours)) > len(set(plain))


def test_seed_reproducibility():
    model = make_model(seed=6, vocab_size=len(CHARS))
    tok = char_tokenizer(META)

    def text(seed):
        return ''.join(piece for _, piece in generate_text(model, tok, ['the '], 40, top_k=20, seed=seed))
    assert text(1) == text(1)
    assert text(1) != text(2)


def test_stop_sequence_ends_text_right_before_it():
    model = make_model(seed=7, vocab_size=len(CHARS))
    tok = char_tokenizer(META)
    full = ''.join(p for _, p in generate_text(model, tok, ['the '], 40, temperature=0))
    stop = full[10:14]  # four characters: four tokens, so the stop spans token boundaries
    cut = ''.join(p for _, p in generate_text(model, tok, ['the '], 40, temperature=0, stop=stop))
    assert cut == full[:full.index(stop)]
    # BPE: a stop that starts inside one token and ends inside another
    bpe = gpt2_tokenizer()
    text = "Hello there, general Kenobi. You are a bold one."
    stream = TextStream(bpe, stop="eral Ke")
    pieces = [stream.add(t) for t in bpe.encode(text)] + [stream.finish()]
    assert ''.join(pieces) == "Hello there, gen" and stream.stopped
    # several stops: the earliest wins; <|endoftext|> stops too
    stream = TextStream(bpe, stop=["bold", "general"])
    assert ''.join([stream.add(t) for t in bpe.encode(text)] + [stream.finish()]) == "Hello there, "
    stream = TextStream(bpe, stop_tokens=[bpe.eot])
    ids = bpe.encode("a b") + [bpe.eot] + bpe.encode(" c")
    assert ''.join([stream.add(t) for t in ids] + [stream.finish()]) == "a b"


def test_streaming_multibyte_characters():
    """GPT-2's BPE splits emoji and some accented or CJK characters across tokens: the stream
    holds a partial character back, so no piece is a replacement character and the pieces
    add up to the text."""
    tok = gpt2_tokenizer()
    text = "Café naïve façade — 🎉🚀 日本語のテキスト, ok! 👩‍👩‍👧 ünïcødé"
    ids = tok.encode(text)
    assert any(_invalid_utf8(tok.token_bytes([t])) for t in ids), "the text should split a character"
    stream = TextStream(tok)
    pieces = [stream.add(t) for t in ids] + [stream.finish()]
    assert all('\ufffd' not in p for p in pieces)
    assert ''.join(pieces) == text == tok.decode(ids)


def _invalid_utf8(b):
    try:
        b.decode('utf-8')
        return False
    except UnicodeDecodeError:
        return True


# -----------------------------------------------------------------------------
# the scripts, on a tiny checkpoint

@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """A directory holding data/tiny (a character dataset) and out/ckpt.pt trained on it by
    train.py, run from that directory as a user would."""
    root = tmp_path_factory.mktemp('sampling')
    data = root / 'data' / 'tiny'
    data.mkdir(parents=True)
    ids = np.array([META['stoi'][c] for c in TEXT], dtype=np.uint16)
    n = int(0.9 * len(ids))
    ids[:n].tofile(data / 'train.bin')
    ids[n:].tofile(data / 'val.bin')
    with open(data / 'meta.pkl', 'wb') as f:
        pickle.dump(META, f)
    run_script(REPO / 'train.py', '--dataset=tiny', '--device=cpu', '--compile=False', '--dtype=float32',
               '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4',
               '--gradient_accumulation_steps=1', '--max_iters=10', '--eval_interval=10', '--eval_iters=2',
               '--warmup_iters=2', '--lr_decay_iters=10', '--learning_rate=1e-2', '--out_dir=out',
               cwd=root, env={'PYTHONPATH': str(REPO), **ONE_THREAD}, timeout=180)
    assert (root / 'out' / 'ckpt.pt').exists() and (root / 'out' / 'meta.pkl').exists()
    return root


def test_sample_script_prints_samples(workdir):
    proc = run_script('sample.py', f'--out_dir={workdir / "out"}', '--device=cpu', '--num_samples=2',
                      '--max_new_tokens=30', '--start=the quick', '--seed=3', env=ONE_THREAD, timeout=120)
    out = ''.join(line for line in proc.stdout.splitlines(keepends=True) if not line.startswith('Overriding'))
    samples = out.split('---------------\n')
    assert len(samples) == 3 and samples[2] == '', proc.stdout  # two samples, each with its separator
    for s in samples[:2]:
        assert s.startswith('the quick') and len(s.rstrip('\n')) > len('the quick')
        assert set(s) <= set(CHARS)
    # progress into a pipe: a line on stderr at every tenth of the 2 x 30 tokens, no progress bar
    progress = [line for line in proc.stderr.splitlines() if line.startswith('sampling: ')]
    assert [int(re.fullmatch(r'sampling: (\d+)/60 tokens, [\d.]+ tok/s, \d+s left', line).group(1))
            for line in progress] == list(range(6, 61, 6)), proc.stderr
    assert '\r' not in proc.stderr


def test_sample_script_interactive_through_a_pipe(workdir):
    proc = subprocess.run([sys.executable, 'sample.py', f'--out_dir={workdir / "out"}', '--device=cpu',
                           '--interactive=True', '--max_new_tokens=20', '--temperature=0'],
                          input='the lazy\nfive dozen\n', cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **ONE_THREAD))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a prompt marker per line read, then one more before EOF; a continuation after each of the two
    chunks = proc.stdout.split('> ')
    assert len(chunks) == 4, proc.stdout
    assert all(len(c.strip('\n')) > 0 for c in chunks[1:3]), proc.stdout
    assert chunks[3].strip() == ''


def test_bench_sample_mode_tiny(workdir):
    proc = run_script('bench.py', '--mode=sample', '--device=cpu', '--n_layer=2', '--n_head=2', '--n_embd=32',
                      '--block_size=64', '--prompt_tokens=4', '--max_new_tokens=8', '--batch_sizes=[1, 3]',
                      '--compare_hf=True', env=ONE_THREAD, timeout=120)
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(('ours', 'transformers', 'uncached'))]
    table = [r for r in rows if r[-1].endswith('x')]
    assert len(table) == 6, proc.stdout  # 3 implementations x 2 batch sizes
    assert all(float(r[-2].replace(',', '')) > 0 for r in table)
    assert 'same logits' in proc.stdout
    # a checkpoint (bias=False, exact GELU) against its transformers twin
    proc = run_script('bench.py', '--mode=sample', '--init_from=resume', f'--out_dir={workdir / "out"}',
                      '--device=cpu', '--prompt_tokens=4', '--max_new_tokens=6', '--batch_sizes=[2]',
                      '--compare_hf=True', '--compare_uncached=False', env=ONE_THREAD, timeout=120)
    assert 'same logits' in proc.stdout and 'transformers' in proc.stdout.split('impl')[-1]


def test_bench_train_mode_and_profile(workdir):
    tiny = ['--device=cpu', '--dtype=float32', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32',
            '--batch_size=2', '--dataset=tiny']
    proc = run_script(REPO / 'bench.py', *tiny, '--warmup_iters=1', '--max_iters=2', cwd=workdir,
                      env={'PYTHONPATH': str(REPO), **ONE_THREAD}, timeout=120)
    assert 'time per iteration' in proc.stdout and 'MFU' in proc.stdout
    trace_dir = workdir / 'bench_log'
    proc = run_script(REPO / 'bench.py', *tiny, '--real_data=False', '--profile=True', f'--profile_dir={trace_dir}',
                      '--profile_wait=1', '--profile_warmup=1', '--profile_active=2', cwd=workdir,
                      env={'PYTHONPATH': str(REPO), **ONE_THREAD}, timeout=120)
    traces = list(trace_dir.glob('*.pt.trace.json'))
    assert len(traces) == 1 and traces[0].stat().st_size > 0, proc.stdout


def test_set_threads_keeps_a_core_free_by_default():
    before = torch.get_num_threads()
    try:
        for default, threads, expected in [(2, 0, 1), (8, 0, 7), (1, 0, 1), (2, 2, 2), (8, 3, 3)]:
            torch.set_num_threads(default)
            set_threads(threads)
            assert torch.get_num_threads() == expected, (default, threads)
    finally:
        torch.set_num_threads(before)
