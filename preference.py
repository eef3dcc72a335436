"""
Preference pairs and the DPO loss (Rafailov et al., 2023), for dpo.py: pairs read from JSONL, each side
rendered as the chat it is (the model's chat tokens or its own template, as train.py's chat data is) with the
loss on the reply's tokens only, a reply's summed log-probability, and the sigmoid loss with its rewards.

A line is TRL's conversational preference format, {"prompt": [messages], "chosen": [messages],
"rejected": [messages]} (the replies' messages only), or the hub's ultrafeedback_binarized shape,
{"prompt": "text", "chosen": [whole conversation], "rejected": [whole conversation]}, where both
conversations share every message but the last reply.
"""
import json

import torch
from torch.nn import functional as F

from tokenizer import chat_tokens, conversation_of, read_jsonl, render_chat


def pair_of(obj):
    """(prompt, chosen, rejected) as [(role, content), ...] lists from one line's object; ValueError saying
    what is wrong."""
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), list) and obj[k] for k in ('chosen', 'rejected')):
        raise ValueError('expected {"prompt": ..., "chosen": [messages], "rejected": [messages]}')
    if isinstance(obj.get('prompt'), list):  # TRL's: the prompt's messages, then each reply's
        prompt, chosen, rejected = obj['prompt'], obj['chosen'], obj['rejected']
    else:  # ultrafeedback_binarized's (or no prompt): whole conversations that differ in the last reply
        if obj['chosen'][:-1] != obj['rejected'][:-1] or len(obj['chosen']) < 2:
            raise ValueError("chosen and rejected must be the same conversation up to their last reply")
        prompt, chosen, rejected = obj['chosen'][:-1], obj['chosen'][-1:], obj['rejected'][-1:]
    if not all(isinstance(m, dict) and m.get('role') == 'assistant' for m in chosen + rejected):
        raise ValueError("chosen and rejected replies must be assistant messages")
    whole = [conversation_of({'messages': prompt + reply}) for reply in (chosen, rejected)]
    n = len(prompt)
    return whole[0][:n], whole[0][n:], whole[1][n:]


def read_pairs(path):
    """The preference pairs of a JSONL file; ValueError naming the line that is wrong."""
    pairs = read_jsonl(path, lambda line: pair_of(json.loads(line)))
    if not pairs:
        raise ValueError(f"{path} holds no preference pairs")
    return pairs


def encode_reply(tokenizer, prompt, reply):
    """(ids, mask) of the conversation prompt + reply, the mask 1 only on the reply's tokens the model learns
    (its text and end of turn, as train.py's chat data): the prompt is rendered as a generation prompt, which
    must begin the whole conversation's rendering."""
    ids, mask = chat_tokens(tokenizer, prompt + reply)
    head = render_chat(tokenizer, prompt)[0]
    if ids[:len(head)] != head:
        raise ValueError("the chat template renders the prompt differently inside the whole conversation")
    return ids, [0] * len(head) + mask[len(head):]


def batch(encoded, device):
    """Right-padded (x, y) for a list of (ids, mask): y is the next token where the mask learns it, else -1."""
    T = max(len(ids) for ids, _ in encoded) - 1
    x = torch.zeros(len(encoded), T, dtype=torch.long)
    y = torch.full((len(encoded), T), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(encoded):
        ids, mask = torch.tensor(ids), torch.tensor(mask)
        x[i, :len(ids) - 1] = ids[:-1]
        y[i, :len(ids) - 1] = torch.where(mask[1:] == 1, ids[1:], -1)
    return x.to(device), y.to(device)


def reply_logps(logits, y):
    """Each row's log-probability of its reply: the sum over positions whose target is not -1."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    return (logp * (y != -1)).sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """DPO's sigmoid loss per pair, -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), and the implicit
    rewards beta * (pi - ref) of the chosen and the rejected reply (detached)."""
    chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return losses, beta * chosen.detach(), beta * rejected.detach()
