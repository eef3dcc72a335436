"""GSM8K: grade-school math word problems; the answer is the number after '####'. openai/gsm8k, config
'main'; rows {question, answer (the worked solution, ending '#### <number>')}."""
import re

HUB = 'openai/gsm8k'
SPLIT, FEWSHOT_SPLIT, SAMPLER = 'test', 'train', 'random'
STOP = ['Question:', '</s>', '<|im_end|>']  # lm-eval-harness's gsm8k stops a base model's answer here
ANSWER = re.compile(r'#### (-?[0-9.,]+)')


def final_number(text):
    """The number after the first '####' (commas dropped, a trailing full stop too), or None."""
    m = ANSWER.search(text)
    return m.group(1).replace(',', '').rstrip('.') if m else None


def example(row):
    return dict(query=f"Question: {row['question']}\nAnswer:", shot_answer=row['answer'], question=row['question'],
                answer=final_number(row['answer']))


def correct(ex, reply):
    return final_number(reply) is not None and final_number(reply) == ex['answer']
