"""
Sampling: from a batch of logits to one token per row, each row with its own settings.

SlotTables holds the per-row tensors the sampler reads (token counts for the penalties, logit_bias,
grammar bitmasks), indexed by the row's slot in the engine's cache; sample_tokens draws the tokens.
engine.py calls both; a new sampling setting goes in Row (engine.py), SlotTables.adjust and here.
"""
import torch

MIN_TEMPERATURE = 1e-5  # below this, dividing the logits by the temperature means nothing: greedy


class SlotTables:
    """Per-slot tensors, made when a row first needs them: counts (max_rows, vocab) of the tokens each
    row has seen (for its penalties), bias (max_rows, vocab) its logit_bias, words (max_rows, vocab / 32)
    the int32 bitmask its grammar fills each step."""

    def __init__(self, max_rows, vocab, device):
        self.max_rows, self.vocab, self.device = max_rows, vocab, device
        self.counts = self.bias = self.words = None

    def init(self, slot, row):
        """Set up `slot` for a row that joins: its prompt counted, its logit_bias written."""
        if row.uses_penalties:
            if self.counts is None:
                self.counts = torch.zeros(self.max_rows, self.vocab, device=self.device)
            self.counts[slot].zero_()
            self.counts[slot].index_add_(0, torch.tensor(row.prompt, device=self.device),
                                         torch.ones(len(row.prompt), device=self.device))
        if self.bias is not None:
            self.bias[slot].zero_()
        if row.logit_bias:
            if self.bias is None:
                self.bias = torch.zeros(self.max_rows, self.vocab, device=self.device)
            ids = torch.tensor(list(row.logit_bias), device=self.device)
            self.bias[slot, ids] = torch.tensor(list(row.logit_bias.values()), device=self.device, dtype=torch.float)

    def move(self, slot, last):
        """Slot `last`'s tables into `slot` (the engine keeps its rows at slots 0..n-1)."""
        for table in (self.counts, self.bias):
            if table is not None:
                table[slot] = table[last]

    def reorder(self, slots, sources):
        """Each of `slots` takes the seen-token counts of the slot at the same place in `sources` (a beam
        search's rows follow their parents)."""
        if self.counts is not None:
            self.counts[slots] = self.counts[sources]

    def count(self, slots, tokens, by=1):
        """Each (slot, token) pair has been seen once more (by=-1: once fewer, to take a count back)."""
        if self.counts is not None and slots:
            index = (torch.tensor(slots, device=self.device), torch.tensor(tokens, device=self.device))
            self.counts.index_put_(index, torch.full((len(slots),), float(by), device=self.device), accumulate=True)

    def adjust(self, rows, slots, logits, vocab_size):
        """The logits (n, V) the sampler draws from: the rows' penalties and logit_bias applied, no NaN or
        infinity, ids >= vocab_size and those a row's grammar forbids at -inf."""
        x = logits
        if any(r.uses_penalties for r in rows):
            rep, presence, frequency = (torch.tensor(p, device=self.device)[:, None] for p in zip(*(r.penalties for r in rows)))
            x = apply_penalties(x, self.counts[slots], rep, presence, frequency)
        if self.bias is not None:
            x = x + self.bias[slots]
        # no NaN or infinity gets to the sampler, whatever a setting did to the logits
        x = torch.nan_to_num(x, nan=-1e30).clamp(-1e30, 1e30)
        if vocab_size < x.size(-1):
            x[:, vocab_size:] = float('-inf')
        if any(r.constraint is not None for r in rows):  # a grammar's rows and free rows, in the one call after
            x = x.masked_fill(~self.allowed(rows, x.size(-1)), float('-inf'))
        return x

    def allowed(self, rows, V):
        """(n, V) bools: the ids each row's constraint allows next (every id for a row without one)."""
        if self.words is None:
            self.words = torch.zeros(self.max_rows, (V + 31) // 32, dtype=torch.int32)
        words = self.words[:len(rows)].fill_(-1)
        for i, row in enumerate(rows):
            if row.constraint is not None:
                row.constraint.fill_bitmask(words[i].numpy())  # the numpy view shares the tensor's memory
        allowed = ((words[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).view(len(rows), -1)[:, :V].bool()
        if not bool(allowed.any(-1).all()):
            raise ValueError("the row's grammar allows no token")
        return allowed.to(self.device)


def logprobs_of(logits, tokens, n, vocab_size):
    """(log probability of each row's token, its n most likely alternatives as [(id, logprob)]):
    the model's own distribution, log-softmax at temperature 1 before any sampling filter."""
    logprobs = logits.float().clone()
    logprobs[:, vocab_size:] = float('-inf')
    logprobs = logprobs.log_softmax(-1)
    picked = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    top = logprobs.topk(max(n, 1))
    return [(p, list(zip(i[:n], v[:n]))) for p, i, v in zip(picked, top.indices.tolist(), top.values.tolist())]


def apply_penalties(logits, counts, repetition_penalty, presence_penalty, frequency_penalty):
    """Discourage tokens already seen (counts: (n, vocab) occurrences; penalties: (n, 1))."""
    seen = counts > 0
    penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
    logits = torch.where(seen, penalised, logits)
    return logits - presence_penalty * seen.float() - frequency_penalty * counts


def sample_tokens(logits, temperature, top_k, top_p, uniform):
    """One token per row of logits (n, vocab), each row with its own settings, given as
    tensors of n: temperature (below MIN_TEMPERATURE: greedy), top_k (0: off; tokens tied
    with the k-th stay in), top_p (1: off; the most likely token always stays) and uniform,
    the row's random draw in [0, 1). The draw picks a token by inverse transform sampling over
    the kept tokens in id order, so a row gets the same token whatever the other rows are."""
    n, V = logits.shape
    sampled = temperature >= MIN_TEMPERATURE
    if not bool(sampled.any()):
        return logits.argmax(-1)
    greedy = 0 if bool(sampled.all()) else logits.argmax(-1)  # a pass over the vocabulary, skipped when unused
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    k_max = int(k.max())
    if k_max < V and bool((top_k > 0).all()):
        # the usual case (every row has a top_k): work on the best candidates only. Twice k_max
        # of them, as logits rounded to bfloat16 often tie at the cut (9 in 10 steps of a random
        # GPT-2, top_k 200); only a tie run past the last candidate needs the slow path.
        values, ids = logits.topk(min(2 * k_max, V))
        kth = values.gather(1, (k - 1)[:, None])
        if values.size(1) == V or bool((values[:, -1:] < kth).all()):
            keep = values >= kth
            weights = _nucleus(_weights(values.masked_fill(~keep, float('-inf')), temperature), top_p)
            by_id = ids.argsort(-1)
            choice = draw(weights.gather(1, by_id), uniform)
            return torch.where(sampled, ids.gather(1, by_id).gather(1, choice[:, None])[:, 0], greedy)
    limited = (top_k > 0) & (top_k < V)
    if bool(limited.any()):  # keep each limited row's top_k (and ties); the other rows keep everything
        k_limited = int(k[limited].max())
        kth = logits.topk(k_limited).values.gather(1, (k.clamp(max=k_limited) - 1)[:, None])
        logits = logits.masked_fill((logits < kth) & limited[:, None], float('-inf'))
    weights = _weights(logits, temperature)
    if bool((top_p < 1).any()):
        ranked, order = weights.sort(descending=True)
        weights = torch.zeros_like(weights).scatter(1, order, _nucleus(ranked, top_p))
    return torch.where(sampled, draw(weights, uniform), greedy)


def probabilities(logits, temperature, top_k, top_p):
    """The distribution sample_tokens draws each row's token from, (n, vocab), each row summing to 1: top_k
    (ties kept), the temperature, then top_p; a greedy row has all of it on its argmax. Speculative decoding
    (speculative.py) accepts a proposed token with this probability."""
    n, V = logits.shape
    limited = (top_k > 0) & (top_k < V)
    if bool(limited.any()):
        k = torch.where(limited, top_k, 1)
        kth = logits.topk(int(k.max())).values.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill((logits < kth) & limited[:, None], float('-inf'))
    weights = _weights(logits, temperature)
    if bool((top_p < 1).any()):
        ranked, order = weights.sort(descending=True)
        weights = torch.zeros_like(weights).scatter(1, order, _nucleus(ranked, top_p))
    greedy = torch.zeros_like(weights).scatter(1, logits.argmax(-1, keepdim=True), 1.0)
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.where((temperature < MIN_TEMPERATURE)[:, None], greedy, weights)


def _weights(logits, temperature):
    """Unnormalised probabilities: the row's largest logit goes to 0 before the division by the
    temperature, so nothing overflows and the most likely token has weight 1."""
    t = temperature.clamp(min=MIN_TEMPERATURE)[:, None]
    return ((logits - logits.max(-1, keepdim=True).values) / t).exp()


def _nucleus(ranked, top_p):
    """top_p on weights sorted in descending order: drop a token when the tokens ranked above it
    already reach top_p of the total."""
    if not bool((top_p < 1).any()):
        return ranked
    above = ranked.cumsum(-1) - ranked
    drop = above >= top_p[:, None] * ranked.sum(-1, keepdim=True)
    drop[:, 0] = False
    return ranked.masked_fill(drop, 0.0)


def draw(weights, uniform):
    """The column where each row's uniform draw lands in the cumulative weights (unnormalised, (n, V))."""
    cdf = weights.cumsum(-1)
    choice = torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:], right=True)
    return choice[:, 0].clamp(max=weights.size(-1) - 1)
