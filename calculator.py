"""
The chat model's calculator. A model whose tokenizer has the tool tokens may write
<|python_start|>expression<|python_end|> in a reply; the expression is evaluated here and
<|output_start|>result<|output_end|> goes back into the reply as tokens the engine feeds before
sampling resumes (Row.forced). textgen.decode_step does this for every row that carries a
ToolCalls (row.calculator), so sample.py --chat, chat_eval.py, serve.py and rl.py all behave the same.

calculate() never runs code: it parses the expression with ast and computes numbers and
+ - * / // % ( ) itself, with limits on the expression's length, on the size of every result
along the way and on the time; anything else gives an error string as the output.
"""
import ast
import math
import operator
import time

from tokenizer import PART_TOKENS

MAX_CHARS = 200  # the longest expression
MAX_DIGITS = 50  # every intermediate result stays below 10**MAX_DIGITS in size
TIME_LIMIT = 0.1  # seconds; the limits above keep any allowed expression far below it
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
             ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
SIGNS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
ALLOWED = set('0123456789.eE_+-*/%() \t\n')  # the characters of numbers (1.5e3, 1_000) and operators


class CalculatorError(Exception):
    pass


def calculate(expression):
    """The value of an arithmetic expression as text ("42", "0.2"), or "error: <why>"."""
    try:
        if len(expression) > MAX_CHARS:
            raise CalculatorError(f"the expression is longer than {MAX_CHARS} characters")
        if not set(expression) <= ALLOWED:  # no names, strings or brackets reach the parser
            raise CalculatorError("only numbers and + - * / // % ( ) are allowed")
        tree = ast.parse(expression.strip(), mode='eval')
        return number_text(evaluate(tree.body, time.perf_counter() + TIME_LIMIT))
    except CalculatorError as e:
        return f"error: {e}"
    except ZeroDivisionError:
        return "error: division by zero"
    except OverflowError:  # an int too large for a float, in a division
        return "error: the result is too large"
    except Exception:  # a syntax error, a number too long for int(), nesting too deep for the parser
        return "error: not an arithmetic expression"


def evaluate(node, deadline):
    if time.perf_counter() > deadline:
        raise CalculatorError("took too long")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # bool and str are not numbers here
        value = node.value
    elif isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        value = OPERATORS[type(node.op)](evaluate(node.left, deadline), evaluate(node.right, deadline))
    elif isinstance(node, ast.UnaryOp) and type(node.op) in SIGNS:
        value = SIGNS[type(node.op)](evaluate(node.operand, deadline))
    else:
        raise CalculatorError("only numbers and + - * / // % ( ) are allowed")
    # checked after every operation, so no operand is ever large: each step is quick
    if not math.isfinite(value) or abs(value) >= 10 ** MAX_DIGITS:
        raise CalculatorError("the result is too large")
    return value


def number_text(value):
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))  # 48/2 is 24, as a person writes it
    return str(value) if isinstance(value, int) else format(value, '.12g')


TOOL_TOKENS = (*PART_TOKENS['python'], *PART_TOKENS['python_output'])


class ToolCalls:
    """One reply's calculator. after(token) sees every token of the reply in turn and returns the
    ids to force next: <|output_start|>result<|output_end|> when the token closes a call, else []."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.start, self.end, self.output_start, self.output_end = (tokenizer.special_tokens[t] for t in TOOL_TOKENS)
        self.call = None  # the open call's tokens so far

    def after(self, token):
        if token == self.start:
            self.call = []
        elif self.call is not None and token == self.end:
            result = calculate(self.tokenizer.decode(self.call))
            self.call = None
            return [self.output_start, *self.tokenizer.encode(result), self.output_end]
        elif self.call is not None:
            self.call.append(token)
        return []


def tool_calls(tokenizer, enabled=True):
    """A ToolCalls for one reply, or None when disabled or the tokenizer has no tool tokens."""
    return ToolCalls(tokenizer) if enabled and all(t in tokenizer.special_tokens for t in TOOL_TOKENS) else None
