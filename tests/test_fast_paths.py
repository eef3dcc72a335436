"""
The fast paths: dtype='auto' picks bfloat16 only where the hardware computes it natively (and says
why), int8 weight-only Linears stay close to float32, and an explicit --dtype=float32 behaves as
before. Tiny models, offline, a few seconds.
"""
import copy

import pytest
import torch

import common
from engine import Engine, generate
from common import auto_dtype, check_device_dtype
from inference import Int8Linear, PackedLinear, for_inference
from model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures('one_thread')

TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=96, dropout=0.0)


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


@pytest.mark.parametrize('flags, expected', [({'avx512f', 'avx512_bf16'}, 'bfloat16'), ({'amx_bf16', 'amx_tile'}, 'bfloat16'),
                                             ({'avx2', 'avx512f'}, 'float32')])
def test_auto_dtype_on_cpu_follows_the_flags(monkeypatch, capsys, flags, expected):
    monkeypatch.setattr(common, 'cpu_flags', lambda: flags)
    monkeypatch.setattr(common, 'bfloat16_speedup', lambda: 2.0)
    assert auto_dtype('cpu', 'auto') == expected
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"dtype: {expected} (auto: ") and len(line.splitlines()) == 1
    assert check_device_dtype('cpu', 'auto') == common.DTYPES[expected]


def test_auto_dtype_takes_float32_where_bfloat16_is_not_faster(monkeypatch, capsys):
    """The instructions are there, but the probe finds bfloat16 matmuls slower (as on some VMs' hosts)."""
    speedup = common.bfloat16_speedup.__wrapped__()  # the probe itself, on this machine
    assert 0 < speedup < 100
    monkeypatch.setattr(common, 'cpu_flags', lambda: {'avx512f', 'avx512_bf16'})
    monkeypatch.setattr(common, 'bfloat16_speedup', lambda: 0.5)
    assert auto_dtype('cpu', 'auto') == 'float32'
    assert 'AVX-512 BF16, and its bfloat16 matmuls ran 0.5x' in capsys.readouterr().err


def test_auto_dtype_without_proc_cpuinfo_asks_torch(monkeypatch):
    monkeypatch.setattr(common, 'cpu_flags', set)
    monkeypatch.setattr(common, 'bfloat16_speedup', lambda: 2.0)
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: True, raising=False)
    assert auto_dtype('cpu', 'auto') == 'bfloat16'
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: False, raising=False)
    assert auto_dtype('cpu', 'auto') == 'float32'


def test_auto_dtype_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda: True)
    assert auto_dtype('cuda', 'auto') == 'bfloat16'
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda: False)
    assert auto_dtype('cuda:0', 'auto') == 'float16'


def test_an_explicit_dtype_is_kept_silently(monkeypatch, capsys):
    monkeypatch.setattr(common, 'cpu_flags', lambda: {'avx512_bf16'})
    for name in ('float32', 'bfloat16', 'float16'):
        assert auto_dtype('cpu', name) == name
    assert check_device_dtype('cpu', 'float32') == torch.float32
    assert capsys.readouterr().err == ''
    with pytest.raises(ValueError, match='auto, float32'):
        check_device_dtype('cpu', 'int8')


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch has no oneDNN")
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_packed_linears_give_the_plain_models_tokens(dtype):
    model = tiny(bias=True, seed=3).to(dtype)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # confident, so greedy tokens are not near-ties
    packed = for_inference(copy.deepcopy(model), 'cpu', dtype)
    assert all(isinstance(m, PackedLinear) for m in (packed.lm_head, packed.transformer.h[0].attn.c_attn))
    assert packed.transformer.wte.weight.dtype == dtype  # the tied embedding stays a plain lookup
    idx = torch.randint(TINY['vocab_size'], (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref, got = model(idx)[0].float(), packed(idx)[0].float()
    # the same products summed in another order: float32 agrees to rounding, bfloat16 to its coarser rounding
    assert ((ref - got).abs().max() / ref.abs().max()).item() < (1e-5 if dtype == torch.float32 else 2e-2)
    prompts = [[1, 2, 3, 4], [5, 6]]
    assert generate(packed, prompts, 12, temperature=0) == generate(model, prompts, 12, temperature=0)
    assert generate(packed, prompts, 12, seed=7, top_k=5) == generate(model, prompts, 12, seed=7, top_k=5)


@pytest.mark.parametrize('switch', [{}, {'use_rope': True}, {'use_alibi': True}])
def test_bfloat16_model_decodes_through_a_float32_cache(switch):
    # a CPU cache is float32 whatever the weights (engine.py); the attention that reads it too,
    # with rows at different lengths (a mask) and ALiBi's float mask included
    model = tiny(seed=3, **switch)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # confident, so greedy tokens are not near-ties
    model = for_inference(model, 'cpu', torch.bfloat16)
    assert Engine(model, 2, 4).cache.k[0].dtype == torch.float32
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9]]
    for prompt, tokens in zip(prompts, generate(model, prompts, 10, temperature=0)):
        with torch.inference_mode():  # the same greedy tokens from full forwards without a cache
            seq = list(prompt)
            for _ in range(10):
                seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
        assert tokens == seq[len(prompt):]


def test_packing_is_for_cpus_and_plain_float_dtypes():
    for device, dtype, pack in [('cpu', torch.float16, True), ('cpu', torch.float32, False)]:
        model = for_inference(tiny(), device, dtype, pack=pack)
        assert type(model.lm_head) is torch.nn.Linear and not model.training


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_int8_logits_close_to_float32(dtype):
    model = tiny(bias=True)
    q = for_inference(copy.deepcopy(model), 'cpu', dtype, 'int8')
    assert isinstance(q.lm_head, Int8Linear) and q.lm_head.weight.dtype == torch.int8
    assert q.transformer.wte.weight.dtype == dtype  # the embedding stays a float lookup
    idx = torch.randint(TINY['vocab_size'], (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref, got = model(idx)[0].float(), q(idx)[0].float()
        err = ((ref - got).abs().max() / ref.abs().max()).item()
    assert err < (2e-2 if dtype == torch.float32 else 5e-2), err
    # through the engine: a float KV cache, not int8 (float32 on a CPU, see engine.py)
    engine = Engine(q, 2, 4)
    assert engine.cache.k[0].dtype == torch.float32


def test_int8_greedy_matches_float32_on_a_confident_model():
    # a model that has learnt something: a sharp next-token table, so greedy tokens are not near-ties
    model = tiny(seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    prompts = [[1, 2, 3, 4], [5, 6]]
    q = for_inference(copy.deepcopy(model), 'cpu', torch.float32, 'int8')
    assert generate(q, prompts, 12, temperature=0) == generate(model, prompts, 12, temperature=0)


def test_int8_linear_without_bias_and_on_3d_input():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=False)
    q = Int8Linear(lin)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        ref, got = lin(x), q(x)
    assert got.shape == (2, 5, 48)
    assert ((ref - got).abs().max() / ref.abs().max()).item() < 2e-2


def test_gguf_q8_0_export(tmp_path):
    gguf = pytest.importorskip('gguf')
    from export import vocabulary, write_gguf
    chars = [chr(c) for c in range(32, 32 + TINY['vocab_size'])]
    v = vocabulary({'vocab_size': len(chars), 'stoi': {c: i for i, c in enumerate(chars)}, 'itos': dict(enumerate(chars))})
    model = tiny()
    write_gguf(model, v, str(tmp_path / 'm.gguf'), 'q8_0')
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / 'm.gguf')).tensors}
    q8 = gguf.GGMLQuantizationType.Q8_0
    assert tensors['blk.0.ffn_up.weight'].tensor_type == q8 and tensors['token_embd.weight'].tensor_type == q8
    assert tensors['position_embd.weight'].tensor_type == gguf.GGMLQuantizationType.F32
    back = gguf.quants.dequantize(tensors['blk.0.ffn_up.weight'].data, q8)
    ref = model.transformer.h[0].mlp.c_fc.weight.detach().numpy()
    assert back.shape == ref.shape and abs(back - ref).max() <= abs(ref).max() / 100
