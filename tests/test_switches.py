"""
The architecture switches and Muon: each switch trains, and its KV-cache decode gives the
uncached forward's logits; ALiBi samples past block_size; GQA shrinks the cache;
newton_schulz orthogonalises; a Muon run resumes exactly; and with every switch at its
default the checkpoint is nanoGPT's GPT-2 format.
"""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, SHAKESPEARE
from engine import generate
from engine import KVCache
from model import GPT, GPTConfig, apply_rope
from muon import newton_schulz

TINY = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=50, dropout=0.0, bias=False)

SWITCHES = {
    'default': {},
    'alibi': dict(use_alibi=True),
    'rope': dict(use_rope=True),
    'rope_theta': dict(use_rope=True, rope_theta=500.0),
    'rmsnorm': dict(norm='rmsnorm'),
    'qk_norm': dict(qk_norm=True),
    'relu2': dict(mlp='relu2'),
    'gqa': dict(n_kv_head=2),
    'mqa': dict(n_kv_head=1),
    'softcap': dict(logit_softcap=10.0),
    'untied': dict(tie_embeddings=False),
    'bias': dict(bias=True),
    'alibi_6_heads': dict(use_alibi=True, n_head=6, n_embd=48),  # not a power of two: the slope fill-up
    'alibi_combo': dict(use_alibi=True, n_kv_head=2, norm='rmsnorm', qk_norm=True, mlp='relu2',
                        logit_softcap=15.0, tie_embeddings=False),
    'rope_combo': dict(use_rope=True, n_kv_head=1, norm='rmsnorm', qk_norm=True, mlp='relu2',
                       logit_softcap=15.0, tie_embeddings=False),
    'embed_norm': dict(embed_norm=True),
    'nanochat': dict(use_rope=True, n_kv_head=2, norm='rmsnorm', qk_norm=True, mlp='relu2', logit_softcap=15.0,
                     tie_embeddings=False, embed_norm=True),  # what export.py writes as NanoChatForCausalLM
}


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**dict(TINY, **overrides)))


def all_logits(model, idx):
    """Uncached logits at every position (passing targets makes forward return them all)."""
    logits, _ = model(idx, targets=torch.zeros_like(idx))
    return logits


@torch.no_grad()
def cached_logits(model, idx, prefix):
    """Logits at positions prefix-1 .. T-1: prefill `prefix` tokens, then one decode step per token."""
    cache = KVCache(model.config, idx.size(0), idx.size(1), idx.device, torch.float32)
    out = [model(idx[:, :prefix], cache=cache)[0][:, -1]]
    for t in range(prefix, idx.size(1)):
        out.append(model(idx[:, t:t + 1], cache=cache)[0][:, -1])
    return torch.stack(out, dim=1), cache


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize('name, optimizer', [(name, 'adamw') for name in SWITCHES] +
                         [(name, 'muon') for name in ('default', 'alibi_combo', 'rope_combo')])
def test_switch_trains_and_cache_matches_forward(name, optimizer):
    model = make_model(**SWITCHES[name])
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cpu', optimizer=optimizer, muon_lr=0.02)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(TINY['vocab_size'], (4, TINY['block_size']), generator=g)
    y = torch.roll(x, -1, dims=1)  # a learnable target: the next token of the same row
    # position-free models decode past block_size; learned positions stop at it
    length = TINY['block_size'] if model.config.learned_positions else 2 * TINY['block_size'] + 3
    probe = torch.randint(TINY['vocab_size'], (2, length), generator=g)
    losses = []
    for step in range(4):
        model.train()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            ref = all_logits(model, probe)
        got, _ = cached_logits(model, probe, prefix=5)
        assert rel_err(got, ref[:, 4:]) <= 1e-4, f"step {step}: cached decode differs from the forward"
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


@torch.no_grad()
def test_alibi_samples_past_block_size():
    model = make_model(use_alibi=True).eval()
    with torch.no_grad():  # larger weights than init, so the logits are far from uniform
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    block = model.config.block_size
    prompt = list(range(1, 11))
    new = generate(model, [prompt], 3 * block, temperature=0)[0]
    seq = torch.tensor([prompt + new])
    assert seq.size(1) == 10 + 3 * block > block
    # greedy sampling with the cache picked the uncached forward's argmax at every position
    ref = all_logits(model, seq)
    assert torch.equal(ref[0, 9:-1].argmax(-1), seq[0, 10:])
    # and the cached logits equal the uncached forward over the whole sequence
    got, _ = cached_logits(model, seq, prefix=len(prompt))
    assert rel_err(got, ref[:, len(prompt) - 1:]) <= 1e-4


@torch.no_grad()
def test_alibi_ragged_batch_matches_single_rows():
    # rows of different lengths decode together: each row sees only its own positions
    model = make_model(use_alibi=True, n_kv_head=2).eval()
    prompts = [[3, 4, 5], list(range(20, 45)), [7]]
    batched = generate(model, prompts, 20, temperature=0)
    for row, prompt in enumerate(prompts):
        assert batched[row] == generate(model, [prompt], 20, temperature=0)[0]


def test_learned_positions_stop_at_block_size():
    model = make_model().eval()
    with pytest.raises(AssertionError, match='block size'):
        model(torch.zeros(1, TINY['block_size'] + 1, dtype=torch.long))


def test_alibi_slopes():
    from model import alibi_slopes
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    # 6 heads: the 4-head slopes, then every other one of the 8-head slopes
    assert torch.allclose(alibi_slopes(6), torch.tensor([2.0 ** -i for i in (2, 4, 6, 8, 1, 3)]))


def test_rope_scores_depend_only_on_relative_position():
    hd = 16
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))

    def rotate(x, pos):
        angles = torch.tensor([[[[float(pos)]]]]) * inv_freq
        return apply_rope(x, angles.cos(), angles.sin())

    score = (rotate(q, 7) * rotate(k, 3)).sum()
    assert torch.allclose(score, (rotate(q, 107) * rotate(k, 103)).sum(), atol=1e-4)
    assert not torch.allclose(score, (rotate(q, 7) * rotate(k, 5)).sum(), atol=1e-4)
    assert torch.allclose(rotate(q, 5).norm(), q.norm())  # a rotation keeps the length


def test_gqa_cache_has_kv_heads():
    for n_kv_head in (1, 2, 4):
        model = make_model(n_kv_head=n_kv_head)
        hd = TINY['n_embd'] // TINY['n_head']
        assert model.transformer.h[0].attn.c_attn.out_features == (TINY['n_head'] + 2 * n_kv_head) * hd
        _, cache = cached_logits(model.eval(), torch.randint(50, (3, 12)), prefix=4)
        for k, v in zip(cache.k, cache.v):
            assert k.shape == v.shape == (3, n_kv_head, 12, hd)


@pytest.mark.parametrize('shape', [(32, 128), (160, 40), (96, 384), (3, 100), (64, 64), (128, 128)])
def test_newton_schulz_singular_values_near_one(shape):
    torch.manual_seed(0)
    rows, cols = shape
    if rows == cols:
        # a square Gaussian matrix is nearly singular (its smallest singular value is ~1/n of the
        # largest), and five steps cannot lift ~0 to 1; Muon's gradients are not like that, so
        # give the square case singular values spread over a factor of 30 instead
        U, _ = torch.linalg.qr(torch.randn(rows, rows))
        V, _ = torch.linalg.qr(torch.randn(cols, cols))
        G = U @ torch.diag(torch.logspace(0, -1.5, rows)) @ V.T * 7.0
    else:
        G = torch.randn(shape) * 3.0  # a wide or tall Gaussian matrix is well conditioned
    X = newton_schulz(G)
    assert X.shape == G.shape and X.dtype == G.dtype
    s = torch.linalg.svdvals(X)
    assert 0.5 <= s.min().item() and s.max().item() <= 1.5, (s.min().item(), s.max().item())
    # only the singular values move: in G's singular bases X is diagonal
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    D = U.T @ X @ Vh.T
    assert (D - torch.diag(torch.diagonal(D))).abs().max() < 1e-3


def test_muon_groups_and_state():
    model = make_model(use_rope=True, tie_embeddings=False)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', optimizer='muon')
    muon = {id(p) for g in opt.param_groups if g['use_muon'] for p in g['params']}
    for name, p in model.named_parameters():
        # Muon takes exactly the matrices inside the blocks; embeddings, head and gains go to AdamW
        assert (id(p) in muon) == (p.dim() == 2 and name.startswith('transformer.h.')), name
    _, loss = model(torch.randint(50, (2, 16)), torch.randint(50, (2, 16)))
    loss.backward()
    opt.step()
    state = opt.state_dict()['state']
    assert all('momentum_buffer' in s or 'exp_avg' in s for s in state.values())
    assert sum('momentum_buffer' in s for s in state.values()) == len(muon)


# ---------------------------------------------------------------------------------------
# train.py as a user runs it, on a tiny char dataset in a temporary directory

def make_dataset(root, name='tiny'):
    text = SHAKESPEARE.read_text()[:30000] if SHAKESPEARE.exists() else 'to be or not to be, that is the question. ' * 700
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    d = root / 'data' / name
    d.mkdir(parents=True)
    n = int(0.9 * len(ids))
    ids[:n].tofile(d / 'train.bin')
    ids[n:].tofile(d / 'val.bin')
    with open(d / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': len(chars), 'itos': dict(enumerate(chars)), 'stoi': stoi, 'dtype': 'uint16'}, f)


TRAIN_ARGS = ['--dataset=tiny', '--device=cpu', '--compile=False', '--dtype=float32', '--n_layer=2', '--n_head=2',
              '--n_embd=32', '--block_size=32', '--batch_size=4', '--gradient_accumulation_steps=2', '--dropout=0.1',
              '--optimizer=muon', '--eval_interval=20', '--eval_iters=2', '--warmup_iters=5', '--lr_decay_iters=40',
              '--learning_rate=3e-3', '--muon_lr=0.03']


def start_train(cwd, *args):
    # one thread each: the two first runs go side by side on a small machine
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    return subprocess.Popen([sys.executable, str(REPO / 'train.py'), *TRAIN_ARGS, *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc):
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def iter_lines(out):
    return [line.split(', time')[0] for line in out.splitlines() if line.startswith('iter ')]


SWITCHED = dict(use_alibi=True, n_kv_head=1, norm='rmsnorm', qk_norm=True, mlp='relu2', logit_softcap=30.0,
                tie_embeddings=False)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Three Muon runs with dropout on: 40 iterations straight; 20, then init_from=resume to 40;
    and 20 iterations with the switches of SWITCHED on."""
    root = tmp_path_factory.mktemp('runs')
    make_dataset(root)
    switched_args = [f'--{k}={v}' for k, v in SWITCHED.items()]
    # the first three go side by side (one thread each)
    straight = start_train(root, '--out_dir=out-straight', '--max_iters=40')
    first = start_train(root, '--out_dir=out-resumed', '--max_iters=20')
    switched = start_train(root, '--out_dir=out-switched', '--max_iters=20', *switched_args)
    out = dict(root=root, straight=finish(straight), first=finish(first), switched=finish(switched))
    out['resumed'] = finish(start_train(root, '--out_dir=out-resumed', '--max_iters=40', '--init_from=resume'))
    return out


def test_muon_run_resumes_exactly(runs):
    straight, first, resumed = iter_lines(runs['straight']), iter_lines(runs['first']), iter_lines(runs['resumed'])
    assert [line.split(':')[0] for line in straight] == [f'iter {i}' for i in range(40)]
    assert first == straight[:20]
    assert 'Resuming training' in runs['resumed']
    assert resumed[0].startswith('iter 20:') and resumed == straight[20:]


def test_default_switches_keep_gpt2_checkpoint_format(runs):
    ckpt = torch.load(runs['root'] / 'out-straight' / 'ckpt.pt', map_location='cpu', weights_only=False)
    assert set(ckpt['model_args']) == {'n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout'}
    # nanoGPT's parameter names and shapes: learned positions, fused qkv, 4x MLP, tied head
    n_embd, block_size, vocab = 32, 32, ckpt['model_args']['vocab_size']
    expected = {'transformer.wte.weight': (vocab, n_embd), 'transformer.wpe.weight': (block_size, n_embd),
                'transformer.ln_f.weight': (n_embd,), 'lm_head.weight': (vocab, n_embd)}
    for i in range(2):
        expected.update({f'transformer.h.{i}.ln_1.weight': (n_embd,), f'transformer.h.{i}.ln_2.weight': (n_embd,),
                         f'transformer.h.{i}.attn.c_attn.weight': (3 * n_embd, n_embd),
                         f'transformer.h.{i}.attn.c_proj.weight': (n_embd, n_embd),
                         f'transformer.h.{i}.mlp.c_fc.weight': (4 * n_embd, n_embd),
                         f'transformer.h.{i}.mlp.c_proj.weight': (n_embd, 4 * n_embd)})
    assert {k: tuple(v.shape) for k, v in ckpt['model'].items()} == expected
    assert ckpt['model']['lm_head.weight'].data_ptr() == ckpt['model']['transformer.wte.weight'].data_ptr()


def test_switches_are_recorded_and_reload(runs):
    assert 'iter 19:' in runs['switched'] and 'done: out-switched/ckpt.pt holds iteration 20' in runs['switched']
    ckpt = torch.load(runs['root'] / 'out-switched' / 'ckpt.pt', map_location='cpu', weights_only=False)
    assert ckpt['model_args'] | SWITCHED == ckpt['model_args']
    assert 'rope_theta' not in ckpt['model_args']  # still at its default: not recorded
    model = GPT(GPTConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])
    assert 'transformer.wpe.weight' not in ckpt['model']


def test_alibi_extrapolation_table(runs):
    proc = subprocess.run([sys.executable, str(REPO / 'sample_alibi_extrapolation.py'),
                           '--out_dirs=["out-switched", "out-straight"]', '--factors=[1, 2]', '--stride=8'],
                          cwd=runs['root'], env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith('| out-')]
    assert len(table) == 3, proc.stdout
    alibi, learned_full, learned_slide = ([c.strip() for c in line.strip('|').split('|')] for line in table)
    assert 'ALiBi' in alibi[0] and 'learned' in learned_full[0]
    assert all(0 < float(v) < 5 for v in alibi[2:] + learned_slide[2:])
    assert learned_full[3].startswith('fails') and 'block size' in learned_full[3]
    assert learned_full[2] == learned_slide[2]  # at 1x the sliding window is the full window
