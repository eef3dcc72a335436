"""Benchmarks, one short file each, scored by chat_eval.py (see its docstring and the README's evaluation section)."""
