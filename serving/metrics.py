"""
GET /metrics: Prometheus' text format, written by hand (no client library needed for a few counters).
The HTTP threads and the worker add to one Metrics; serve.py writes its text with the worker's gauges.
"""
import bisect
import threading


class Metrics:
    """Counters by name and labels, and histograms of seconds; HTTP threads and the worker add to them."""
    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
    HELP = {
        'nanogpt_requests_total': ('counter', "HTTP requests answered, by route and status"),
        'nanogpt_prompt_tokens_total': ('counter', "prompt tokens of the requests that started generating"),
        'nanogpt_prompt_tokens_cached_total': ('counter', "of those, tokens whose keys and values came from the prefix cache"),
        'nanogpt_generated_tokens_total': ('counter', "tokens generated"),
        'nanogpt_draft_tokens_proposed_total': ('counter', "tokens a draft proposed (speculative decoding)"),
        'nanogpt_draft_tokens_accepted_total': ('counter', "of those, tokens the model accepted: accepted / proposed is the rate"),
        'nanogpt_time_to_first_token_seconds': ('histogram', "from a request's arrival to each choice's first token"),
        'nanogpt_inter_token_latency_seconds': ('histogram', "between two tokens of a choice"),
    }

    def __init__(self):
        self.lock = threading.Lock()
        self.counters = {}  # (name, ((label, value), ...)) -> count
        self.histograms = {}  # name -> [count per bucket (and +Inf), sum]

    def add(self, name, value=1, **labels):
        key = (name, tuple(sorted(labels.items())))
        with self.lock:
            self.counters[key] = self.counters.get(key, 0) + value

    def observe(self, name, seconds):
        with self.lock:
            h = self.histograms.setdefault(name, [0] * (len(self.BUCKETS) + 1) + [0.0])
            h[bisect.bisect_left(self.BUCKETS, seconds)] += 1
            h[-1] += seconds

    def text(self, gauges):
        """The exposition text: every counter and histogram, then the gauges given ({name: (help, value)})."""
        lines = []
        with self.lock:
            for name, (kind, help_text) in self.HELP.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                if kind == 'counter':
                    rows = [(labels, v) for (n, labels), v in sorted(self.counters.items()) if n == name] or [((), 0)]
                    lines += [f"{name}{label_text(labels)} {v}" for labels, v in rows]
                    continue
                h = self.histograms.get(name, [0] * (len(self.BUCKETS) + 1) + [0.0])
                for i, le in enumerate([*map(str, self.BUCKETS), '+Inf']):
                    lines.append(f'{name}_bucket{{le="{le}"}} {sum(h[:i + 1])}')
                lines += [f"{name}_sum {h[-1]:.6f}", f"{name}_count {sum(h[:-1])}"]
        for name, (help_text, value) in gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
        return ('\n'.join(lines) + '\n').encode()


def label_text(labels):
    return '{' + ','.join(f'{k}="{v}"' for k, v in labels) + '}' if labels else ''


def gauges(status):
    """The gauges of a worker's status() for Metrics.text."""
    return {'nanogpt_requests_waiting': ("prompts queued for a free row", status['waiting']),
            'nanogpt_rows_running': ("engine rows generating", status['active_rows']),
            'nanogpt_prefix_cache_tokens': ("tokens the prefix cache holds", status['prefix_cache_tokens'])}
