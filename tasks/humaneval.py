"""HumanEval: complete a Python function from its signature and docstring; the task's unit tests decide
(pass@1). openai/openai_humaneval; rows {task_id, prompt, canonical_solution, test, entry_point}."""
import re

from tasks.execution import run_python

HUB = 'openai/openai_humaneval'
SPLIT, FEWSHOT_SPLIT, SAMPLER = 'test', None, None
STOP = ['\nclass', '\ndef', '\n#', '\nif', '\nprint']  # lm-eval-harness's: a base model's completion ends here


def example(row):
    return dict(query=row['prompt'], question=row['prompt'], test=row['test'], entry_point=row['entry_point'])


def program(ex, reply, chat):
    """The code to run: a base model continues the prompt; a chat model answers with the whole function (the
    first ``` block of its reply, else all of it), after the prompt's imports."""
    if not chat:
        code = ex['query'] + reply
    else:
        block = re.search(r'```(?:python)?[^\n]*\n(.*?)```', reply, re.S)
        imports = [line for line in ex['query'].splitlines() if line.startswith(('import ', 'from '))]
        code = '\n'.join(imports) + '\n\n' + (block.group(1) if block else reply)
    return f"{code}\n\n{ex['test']}\n\ncheck({ex['entry_point']})\n"


def correct(ex, reply, chat, timeout):
    return run_python(program(ex, reply, chat), timeout)[0]
