"""
dpo.py: preference pairs in TRL's and ultrafeedback_binarized's shapes render alike, the loss is on the replies'
tokens only, equals the formula computed by hand (and TRL's DPOTrainer's where trl runs here), is ln 2 at step 0
(policy = reference), with and without LoRA; a run resumes exactly and its out_dir loads like train.py's.
"""
import json
import math
import re

import pytest
import torch

from conftest import REPO, run_script
from preference import batch, dpo_loss, encode_reply, read_pairs, reply_logps

TINY = ['--device=cpu', '--compile=False', '--dtype=float32', '--n_layer=2', '--n_head=2', '--n_embd=32',
        '--block_size=96', '--batch_size=4', '--eval_iters=1', '--log_interval=1', '--gradient_accumulation_steps=1',
        '--dataset=chat', '--learning_rate=3e-3']
DPO = ['dpo.py', '--device=cpu', '--dtype=float32', '--data=pairs.jsonl', '--batch_size=2', '--eval_interval=2',
       '--learning_rate=1e-3', '--val_fraction=0.25']


def wrong(reply):
    return re.sub(r'Answer: (\d+)', lambda m: f'Answer: {int(m.group(1)) + 1}', reply)


@pytest.fixture(scope='module')
def sft(tmp_path_factory):
    """A tiny chat model fine-tuned on the built-in task, and pairs of its replies: the right answer chosen,
    the answer plus one rejected; half in TRL's shape, half in ultrafeedback_binarized's."""
    root = tmp_path_factory.mktemp('dpo')
    run_script(REPO / 'data' / 'chat' / 'prepare.py', '--task=arith', '--n_train=200', '--n_val=16',
               f"--out_dir={root / 'data' / 'chat'}", cwd=root)
    run_script(REPO / 'train.py', *TINY, '--out_dir=out-sft', '--max_iters=20', '--eval_interval=20', cwd=root,
               env={'OMP_NUM_THREADS': '1'})
    lines = []
    for n, line in enumerate((root / 'data' / 'chat' / 'val.jsonl').read_text().splitlines()):
        messages = json.loads(line)['messages']
        prompt, reply = messages[:-1], messages[-1]
        rejected = {**reply, 'content': wrong(reply['content'])}
        if n % 2:
            lines.append({'prompt': prompt, 'chosen': [reply], 'rejected': [rejected]})
        else:
            lines.append({'prompt': prompt[-1]['content'], 'chosen': prompt + [reply], 'rejected': prompt + [rejected],
                          'score_chosen': 9.0, 'score_rejected': 2.0})
    (root / 'pairs.jsonl').write_text(''.join(json.dumps(x) + '\n' for x in lines))
    return root


def dpo(root, *args, check=True):
    return run_script(REPO / DPO[0], *DPO[1:], *args, cwd=root, env={'OMP_NUM_THREADS': '1'}, check=check)


def test_both_shapes_read_alike_and_mask_only_the_reply(sft):
    from tokenizer import load_tokenizer
    trl = {'prompt': [{'role': 'user', 'content': 'What is 2 + 2?'}],
           'chosen': [{'role': 'assistant', 'content': 'Answer: 4'}],
           'rejected': [{'role': 'assistant', 'content': 'Answer: 5'}]}
    uf = {'prompt': 'What is 2 + 2?', 'chosen': trl['prompt'] + trl['chosen'], 'rejected': trl['prompt'] + trl['rejected']}
    path = sft / 'two.jsonl'
    path.write_text(json.dumps(trl) + '\n' + json.dumps(uf) + '\n')
    a, b = read_pairs(path)
    assert a == b == ([('user', 'What is 2 + 2?')], [('assistant', 'Answer: 4')], [('assistant', 'Answer: 5')])
    tok = load_tokenizer(str(sft / 'out-sft'))
    ids, mask = encode_reply(tok, *a[:2])
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == 'Answer: 4<|assistant_end|>'
    path.write_text(json.dumps({'prompt': 'x', 'chosen': trl['chosen'], 'rejected': trl['rejected']}) + '\n')
    with pytest.raises(ValueError, match='line 1: chosen and rejected must be the same conversation'):
        read_pairs(path)


def test_loss_and_rewards_equal_the_formula_by_hand(sft, one_thread):
    from checkpoint import load_checkpoint
    from tokenizer import load_tokenizer
    reference, _ = load_checkpoint(str(sft / 'out-sft'))
    policy, _ = load_checkpoint(str(sft / 'out-sft'))
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tok = load_tokenizer(str(sft / 'out-sft'))
    pairs = read_pairs(sft / 'pairs.jsonl')[:3]
    encoded = [encode_reply(tok, p, c) for p, c, _ in pairs] + [encode_reply(tok, p, r) for p, _, r in pairs]
    x, y = batch(encoded, 'cpu')
    with torch.no_grad():
        pol, ref = reply_logps(policy.eval()(x, y)[0], y), reply_logps(reference.eval()(x, y)[0], y)
    losses, chosen, rejected = dpo_loss(pol[:3], pol[3:], ref[:3], ref[3:], beta=0.3)

    def by_hand(model, ids, mask):  # one unpadded sequence, token by token
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))[0][0].double()
        return sum(torch.log_softmax(logits[t], -1)[ids[t + 1]].item() for t in range(len(ids) - 1) if mask[t + 1])
    for i in range(3):
        pc, pr = by_hand(policy, *encoded[i]), by_hand(policy, *encoded[3 + i])
        rc, rr = by_hand(reference, *encoded[i]), by_hand(reference, *encoded[3 + i])
        z = 0.3 * ((pc - rc) - (pr - rr))
        assert abs(losses[i].item() - math.log(1 + math.exp(-z))) < 1e-5
        assert abs(chosen[i].item() - 0.3 * (pc - rc)) < 1e-5 and abs(rejected[i].item() - 0.3 * (pr - rr)) < 1e-5
    assert chosen.abs().max() > 1e-3  # the policy is not the reference: the check is not of zeros


@pytest.mark.parametrize('lora', [False, True])
def test_step_zero_is_ln2_and_a_run_resumes_exactly(sft, lora, tmp_path):
    extra = ['--lora_rank=2', '--learning_rate=1e-2'] if lora else []
    out = f"out-dpo-{'lora' if lora else 'full'}"
    whole = dpo(sft, '--init_from=out-sft', f'--out_dir={out}', '--max_iters=4', *extra)
    first = re.search(r'^iter 0: loss ([\d.]+)', whole.stdout, re.M).group(1)
    assert abs(float(first) - math.log(2)) < 1e-4
    assert abs(float(re.search(r'^step 0: val loss ([\d.]+)', whole.stdout, re.M).group(1)) - math.log(2)) < 1e-4
    assert 'adapters off' in whole.stdout if lora else 'a frozen copy of' in whole.stdout
    ckpt = torch.load(sft / out / 'ckpt.pt', weights_only=True)
    assert ('lora' in ckpt) == lora and ckpt['iter_num'] == 4
    dpo(sft, '--init_from=out-sft', f'--out_dir={out}-b', '--max_iters=2', *extra)
    resumed = dpo(sft, '--init_from=resume', f'--out_dir={out}-b', '--max_iters=4', *extra)
    lines = lambda s: re.findall(r'^iter [23]: [^,]+, rewards [^,]+, accuracy [\d.]+, margin [-\d.]+', s, re.M)  # noqa: E731
    assert len(lines(whole.stdout)) == 2 and lines(whole.stdout) == lines(resumed.stdout)
    # its out_dir: sampled like train.py's (LoRA: merged over the base)
    from textgen import load_model
    model, tok, info = load_model('resume', str(sft / out), pack=False)
    assert info['iter_num'] == 4 and '<|assistant_start|>' in tok.special_tokens


def test_bad_data_is_one_line(sft):
    (sft / 'bad.jsonl').write_text('{"prompt": "x", "chosen": [], "rejected": []}\n')
    for args, message in [(['--data=bad.jsonl'], 'bad.jsonl line 1: expected'), (['--beta=0'], 'beta must be'),
                          (['--data=none.jsonl'], 'cannot read none.jsonl')]:
        proc = dpo(sft, '--init_from=out-sft', '--out_dir=out-bad', *args, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def test_loss_and_rewards_equal_trls_dpo_trainer(tmp_path, one_thread):
    """TRL's DPOTrainer (a test-only dependency) and ours on the same tiny Llama (policy: its weights moved a little;
    reference: as saved), the same pairs in TRL's format, one batch: the same tokens, loss, rewards and gradients."""
    trl = pytest.importorskip('trl')
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from checkpoint import load_pretrained
    from test_llama import CHATML, byte_level_tokenizer, save_llama
    from tokenizer import load_tokenizer
    tok = byte_level_tokenizer(['<|endoftext|>', '<|im_start|>', '<|im_end|>'])
    save_llama(tmp_path / 'ref', tok, CHATML, eos='<|im_end|>', bos='<|endoftext|>', tied=True)
    save_llama(tmp_path / 'policy', tok, CHATML, eos='<|im_end|>', bos='<|endoftext|>', tied=True)
    policy_hf = AutoModelForCausalLM.from_pretrained(tmp_path / 'ref', dtype=torch.float32)
    with torch.no_grad():
        for p in policy_hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    policy_hf.save_pretrained(tmp_path / 'policy')
    lines = [{'prompt': [{'role': 'user', 'content': f'What is {a} + {b}?'}],
              'chosen': [{'role': 'assistant', 'content': f'Answer: {a + b}'}],
              'rejected': [{'role': 'assistant', 'content': f'It is {a + b + 1}, I think'}]}
             for a, b in [(1, 2), (30, 4), (7, 70)]]
    args = trl.DPOConfig(output_dir=str(tmp_path / 'trl'), per_device_train_batch_size=3, beta=0.3, report_to=[],
                         use_cpu=True, bf16=False, disable_dropout=True)
    trainer = trl.DPOTrainer(model=policy_hf, ref_model=AutoModelForCausalLM.from_pretrained(tmp_path / 'ref'),
                             args=args, train_dataset=Dataset.from_list(lines),
                             processing_class=AutoTokenizer.from_pretrained(tmp_path / 'ref'))
    inputs = next(iter(trainer.get_train_dataloader()))
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()
    trl_loss = trl_loss.item()
    metrics = {k: v[-1] for k, v in trainer._metrics['eval' if not trainer.model.training else 'train'].items()}

    path = tmp_path / 'pairs.jsonl'
    path.write_text(''.join(json.dumps(x) + '\n' for x in lines))
    ours_tok = load_tokenizer(str(tmp_path / 'ref'))
    pairs = read_pairs(path)
    encoded = [encode_reply(ours_tok, p, c) for p, c, _ in pairs] + [encode_reply(ours_tok, p, r) for p, _, r in pairs]
    # the same sequences, the same reply tokens (TRL pads on the right too; its order is its sampler's)
    theirs = {tuple(ids[m == 1].tolist()) for ids, m in zip(inputs['input_ids'], inputs['completion_mask'])}
    assert theirs == {tuple(i for i, m in zip(ids, mask) if m) for ids, mask in encoded}
    x, y = batch(encoded, 'cpu')
    policy, reference = load_pretrained(str(tmp_path / 'policy')).eval(), load_pretrained(str(tmp_path / 'ref')).eval()
    pol = reply_logps(policy(x, y)[0], y)
    with torch.no_grad():
        ref = reply_logps(reference(x, y)[0], y)
    losses, chosen, rejected = dpo_loss(pol[:3], pol[3:], ref[:3], ref[3:], beta=0.3)
    losses.mean().backward()
    # the gradients too, every weight under transformers' names (hf.py's map)
    import hf
    grads = hf.to_theirs('llama', policy.config, {k: v.grad for k, v in policy.state_dict(keep_vars=True).items()})
    theirs_grads = dict(trainer.model.named_parameters())  # the tied head once, as the embedding
    assert set(theirs_grads) <= set(grads) and len(theirs_grads) > 10
    for name, p in theirs_grads.items():
        assert (grads[name] - p.grad).abs().max() < 1e-5, name
    assert abs(losses.mean().item() - trl_loss) < 1e-5
    assert abs(chosen.mean().item() - metrics['rewards/chosen']) < 1e-5
    assert abs(rejected.mean().item() - metrics['rewards/rejected']) < 1e-5
    assert abs((chosen - rejected).mean().item() - metrics['rewards/margins']) < 1e-5
    assert (chosen > rejected).float().mean().item() == metrics['rewards/accuracies']
    assert abs(trl_loss - math.log(2)) > 1e-3  # the policy is not the reference
