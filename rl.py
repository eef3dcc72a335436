"""
Reinforcement learning for a chat model, from its fine-tuned (SFT) out_dir. Each step samples k
replies to each of a few training questions through the engine (the calculator answers the calls
the model writes, as in sample.py, chat_eval.py and serve.py), rewards each with reward() below, and
takes a policy-gradient step: advantage = reward - the mean reward of the question's k replies,
loss = -(advantage x log-probability) of every token the model sampled, averaged over those tokens.
A calculator's output is forced into the reply, not sampled: it does not count. There is no
reference model, KL term or PPO clipping (on-policy, as nanochat's chat_rl.py). Every eval_interval
steps it reports held-out pass@1 and pass@k and saves out_dir/ckpt.pt in train.py's format: sample.py,
serve.py, chat_eval.py and export.py load it as they load any checkpoint, and --init_from=resume
continues the run exactly where it stopped.

$ python rl.py --init_from=out-tool --out_dir=out-rl              # questions from data/chat/train.jsonl
$ python rl.py config/rl_demo.py                                   # make rl-demo's run
$ torchrun --standalone --nproc_per_node=2 rl.py config/rl_demo.py  # DDP: each process samples its share
"""
import os
import re
import shutil
import sys
import time

import torch
import torch.nn.functional as F
from torch.distributed import all_reduce, barrier, destroy_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import SaveError, load_checkpoint, save_checkpoint
from common import (autocast, check_training_settings, init_distributed, lock_out_dir, lr_at, nonfinite,
                    resolve_dtype, set_peak_lrs, stable_seed)
from configurator import configure, fail
from textgen import generate_text
from tokenizer import check_vocab, content_text, load_tokenizer, read_conversations, render_chat

# -----------------------------------------------------------------------------
init_from = 'out-chat'  # the fine-tuned model's out_dir, or 'resume' (continue the run in out_dir)
out_dir = 'out-rl'
dataset = 'chat'  # training questions from data/<dataset>/train.jsonl, held-out ones from val.jsonl
max_iters = 100  # optimizer steps
questions_per_step = 16  # training questions per step, across all processes
samples_per_question = 8  # k: replies sampled for each question
batch_size = 64  # replies in one forward/backward (gradients accumulate over the step's replies)
max_new_tokens = 64  # the longest reply
temperature = 1.0  # sampling the replies (the policy as it is: 1.0)
top_k = 0  # 0 = no limit
tools = True  # answer the model's calculator calls while sampling
learning_rate = 1e-4  # decays linearly to 0 at lr_decay_iters when decay_lr
decay_lr = True
lr_decay_iters = 0  # 0: max_iters
optimizer = 'adamw'  # 'adamw' | 'muon' (model.configure_optimizers, as train.py)
muon_lr = 0.002
muon_momentum = 0.95
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 disables
eval_interval = 20  # held-out pass@1 and pass@k, and a checkpoint, every this many steps (and at the end)
eval_questions = 100  # held-out questions scored (0 = all of val.jsonl)
eval_samples = 8  # the k of pass@k
log_interval = 1
seed = 1337
backend = 'auto'  # DDP: 'nccl' | 'gloo' | 'auto' (nccl on CUDA, gloo on CPU)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'float32'  # or 'bfloat16' / 'float16' autocast on a GPU
# -----------------------------------------------------------------------------
configure(globals())
config = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}


def final_answer(text):
    """The text after the last 'Answer:' (or GSM8K's '####'), else all of it; whitespace normalised."""
    match = re.search(r'(?:Answer:|####)((?:(?!Answer:|####).)*)$', text, re.S)
    return ' '.join((match[1] if match else text).split())


def reward(reply, reference):
    """The task's checker: 1.0 when the reply's final answer is the reference's, else 0.0. A plain
    function: replace it for another task (a partial credit, a unit test, a format check)."""
    return float(final_answer(reply) == final_answer(reference))


# checks before any work: the settings every training script shares, as train.py checks them
check_training_settings(globals())
dtype, ptdtype = resolve_dtype(device, dtype)

ddp, rank, _, world, device = init_distributed(device, backend)
if questions_per_step % world:
    fail(f"questions_per_step ({questions_per_step}) must be divisible by the number of processes ({world})")
master = rank == 0  # logs and writes the checkpoints
device_type = 'cuda' if 'cuda' in device else 'cpu'
ctx = autocast(device_type, dtype)
ckpt_path = os.path.join(out_dir, 'ckpt.pt')

# the model, its tokenizer and the questions
source = out_dir if init_from == 'resume' else init_from
if os.path.abspath(source) == os.path.abspath(out_dir) and init_from != 'resume':
    fail("init_from is this run's out_dir: use init_from='resume' to continue it, or pick another out_dir")
try:
    model, checkpoint = load_checkpoint(source, device)
    tokenizer = load_tokenizer(source, (checkpoint.get('config') or {}).get('dataset'))
    check_vocab(tokenizer, model.config.vocab_size)
    if '<|assistant_start|>' not in tokenizer.special_tokens:
        raise ValueError(f"{source} is not a chat model (its tokenizer has no chat tokens): fine-tune one first")
    questions = {split: [(render_chat(tokenizer, m[:-1])[0], content_text(m[-1][1]))
                         for m in read_conversations(os.path.join('data', dataset, f'{split}.jsonl'))]
                 for split in ('train', 'val')}
except (FileNotFoundError, ValueError, OSError) as e:
    fail(str(e))
held_out = questions['val'][:eval_questions or None]
if not questions['train'] or not held_out:
    fail(f"data/{dataset}/train.jsonl and val.jsonl must each hold at least one conversation")
if init_from == 'resume' and 'samples_per_question' not in checkpoint.get('config', {}):
    fail(f"{ckpt_path} was not written by rl.py: start from it with --init_from={out_dir} and another out_dir")
if init_from == 'resume' and checkpoint.get('config', {}).get('optimizer', 'adamw') != optimizer:
    fail(f"{ckpt_path} was trained with optimizer='{checkpoint['config']['optimizer']}', not '{optimizer}'")
iter_num = saved_iter = checkpoint['iter_num'] if init_from == 'resume' else 0
# the architecture travels with the checkpoint: the keys train.py writes, with the SFT model's values
inherited = {k: checkpoint[k] for k in ('model_args', 'gelu_approximate', 'best_val_loss') if k in checkpoint}
raw_model = model.to(device)
opt = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type, optimizer=optimizer,
                                 muon_lr=muon_lr, muon_momentum=muon_momentum)
if init_from == 'resume':
    opt.load_state_dict(checkpoint['optimizer'])
set_peak_lrs(opt, learning_rate, muon_lr)  # this run's, also over a resumed state's (a new learning_rate counts)
checkpoint = None
model = DDP(raw_model) if ddp else raw_model
if master:
    lock_out_dir(out_dir, 'rl.py')  # one run per out_dir, as train.py's
    meta = os.path.join(source, 'meta.pkl')
    if source != out_dir and os.path.exists(meta):  # the tokenizer beside the checkpoint, as train.py leaves it
        shutil.copyfile(meta, os.path.join(out_dir, 'meta.pkl'))


def sample_replies(prompts, n, draw_seed):
    """n replies to each prompt, sampled together through the engine: [(prompt, row, text)] in order."""
    rows, texts = [], [''] * (len(prompts) * n)
    raw_model.eval()
    with ctx:
        for i, piece in generate_text(raw_model, tokenizer, [p for p in prompts for _ in range(n)], max_new_tokens,
                                      seed=draw_seed, tools=tools, keep=rows, temperature=temperature, top_k=top_k):
            texts[i] += piece
    return [(row.prompt, row, text) for row, text in zip(rows, texts)]


def evaluate():
    """Held-out pass@1 (the chance that one sampled reply is right) and pass@k (one of k is), over every process's share."""
    mine = held_out[rank::world]
    rewards = torch.zeros(2, device=device)  # sum of pass@1, sum of pass@k
    replies = sample_replies([p for p, _ in mine], eval_samples, stable_seed(seed, 'eval', iter_num, rank)) if mine else []
    for q, (_, reference) in enumerate(mine):
        r = [reward(text, reference) for _, _, text in replies[q * eval_samples:(q + 1) * eval_samples]]
        rewards += torch.tensor([sum(r) / len(r), max(r)], device=device)
    if ddp:
        all_reduce(rewards)
    return (rewards / len(held_out)).tolist()


def save():
    problem = nonfinite(model=raw_model, probe=held_out[0][0])
    if problem:  # the old ckpt.pt (if any) stays as it was
        fail(f"{problem} at step {iter_num}: training diverged (try a lower learning_rate); stopped before saving it")
    checkpoint = {'model': raw_model.state_dict(), 'optimizer': opt.state_dict(), **inherited, 'iter_num': iter_num,
                  'config': config}
    try:
        save_checkpoint(ckpt_path, checkpoint)
    except SaveError as e:  # a full disk, no permission: the old ckpt.pt (if any) is still whole
        fail(str(e))
    print(f"saved {ckpt_path} (step {iter_num})")


def step_questions(step):
    """The training questions of a step, the same in every process and after a resume: the train
    set in a fresh random order each epoch, questions_per_step at a time; this process's share."""
    n, orders, picks = len(questions['train']), {}, []
    for i in range(step * questions_per_step, (step + 1) * questions_per_step):
        if i // n not in orders:
            orders[i // n] = torch.randperm(n, generator=torch.Generator().manual_seed(stable_seed(seed, 'epoch', i // n)))
        picks.append(questions['train'][int(orders[i // n][i % n])])
    return picks[rank::world]


def train_step(step):
    """Sample, reward, and one policy-gradient update; (mean reward, mean reply length, loss)."""
    mine = step_questions(step)
    replies = sample_replies([p for p, _ in mine], samples_per_question, stable_seed(seed, 'sample', step, rank))
    batch = []  # (tokens, targets, advantage) of each reply that moves the loss
    stats = torch.zeros(3, device=device)  # reward sum, length sum, sampled tokens
    for q, (_, reference) in enumerate(mine):
        group = replies[q * samples_per_question:(q + 1) * samples_per_question]
        rewards = [reward(text, reference) for _, _, text in group]
        mean = sum(rewards) / len(rewards)
        for (prompt, row, _), r in zip(group, rewards):
            # learn only the tokens the model sampled: not the prompt's, not the calculator's output
            targets = [-1] * (len(prompt) - 1) + [t if s else -1 for t, s in zip(row.tokens, row.sampled)]
            stats += torch.tensor([r, len(row.tokens), sum(row.sampled)], device=device)
            if r != mean:  # a zero advantage adds nothing to the gradient (its tokens still count below)
                block = raw_model.config.block_size  # the last block_size positions, as the engine saw them
                batch.append(((prompt + row.tokens)[:-1][-block:], targets[-block:], r - mean))
    if ddp:
        all_reduce(stats)
    n_tokens = max(stats[2].item(), 1)  # the loss is a mean over every sampled token of the step, in all processes
    lr = lr_at(step, learning_rate, 0, lr_decay_iters or max_iters, 0.0, 'linear') if decay_lr else learning_rate
    for group in opt.param_groups:
        group['lr'] = group['initial_lr'] * lr / learning_rate
    raw_model.train()
    # nothing to learn (every reply of every question scored the same): one empty row, so that under DDP this
    # process still joins the gradients' all-reduce
    chunks = [batch[i:i + batch_size] for i in range(0, len(batch), batch_size)] or [[([0], [-1], 0.0)]]
    loss_sum = 0.0
    for c, chunk in enumerate(chunks):
        if ddp:  # all-reduce the gradients on the last chunk only
            model.require_backward_grad_sync = c == len(chunks) - 1
        width = max(len(x) for x, _, _ in chunk)
        x = torch.tensor([x + [0] * (width - len(x)) for x, _, _ in chunk], device=device)
        y = torch.tensor([y + [-1] * (width - len(y)) for _, y, _ in chunk], device=device)
        advantage = torch.tensor([a for _, _, a in chunk], device=device)
        with ctx:
            logits, _ = model(x, y)
        logprobs = -F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction='none')
        # DDP averages the processes' gradients: times world, the step's gradient is the sum over all tokens / n_tokens
        loss = -(logprobs.view_as(y) * advantage[:, None]).sum() * world / n_tokens
        loss.backward()
        loss_sum += loss.item() / world  # this process's part of the step's loss
    if ddp:  # for the log: the whole step's loss
        loss_sum = torch.tensor(loss_sum, device=device)
        all_reduce(loss_sum)
        loss_sum = loss_sum.item()
    if nonfinite(loss=loss_sum):  # before the step: the weights stay as they were
        fail(f"{nonfinite(loss=loss_sum)} at step {step}: training diverged (try a lower learning_rate)")
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    n = questions_per_step * samples_per_question
    return stats[0].item() / n, stats[1].item() / n, loss_sum


try:
    t0 = time.time()
    while True:
        if iter_num % eval_interval == 0 or iter_num == max_iters:
            pass1, passk = evaluate()
            if master:
                print(f"step {iter_num}: held-out pass@1 {pass1:.4f}, pass@{eval_samples} {passk:.4f} "
                      f"({len(held_out)} questions, temperature {temperature})")
                if iter_num > 0 and iter_num != saved_iter:  # after a resume, ckpt.pt already holds this step
                    save()
        if iter_num >= max_iters:
            break
        mean_reward, mean_length, loss = train_step(iter_num)
        dt, t0 = time.time() - t0, time.time()
        if master and iter_num % log_interval == 0:
            print(f"iter {iter_num}: reward {mean_reward:.4f}, reply length {mean_length:.1f}, loss {loss:.6f}, "
                  f"time {dt * 1000:.0f}ms")
        iter_num += 1
except KeyboardInterrupt:
    if master:
        print(f"interrupted at step {iter_num}; {ckpt_path} holds the last saved step")
    sys.exit(130)
if ddp:
    barrier()
    destroy_process_group()
