"""
configurator.py, exercised the way scripts use it: a throwaway script defines its
settings as globals, calls configure(globals()) and prints what it ended up with.
"""
import ast
import textwrap

import pytest

from conftest import REPO, run_script

SCRIPT = f"""
import os
import sys
sys.path.insert(0, {str(REPO)!r})

batch_size = 12
learning_rate = 6e-4
compile = True
device = 'cuda'
init_from = None
betas = (0.9, 0.95)
_private = 'not a setting'

from configurator import configure
configure(globals())
print('RESULT', repr(dict(batch_size=batch_size, learning_rate=learning_rate, compile=compile,
                          device=device, init_from=init_from, betas=betas)))
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / 'script.py'
    path.write_text(SCRIPT)
    return path


def run(script, *args):
    # run from the script's folder so relative config file paths resolve there
    return run_script(script, *args, cwd=script.parent, check=False)


def result(proc):
    assert proc.returncode == 0, proc.stderr
    line = next(l for l in proc.stdout.splitlines() if l.startswith('RESULT '))
    return ast.literal_eval(line[len('RESULT '):])


def error(proc):
    """The one stderr line of a failed run (exit 1, no traceback, the script never ran)."""
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert 'Traceback' not in proc.stderr, proc.stderr
    assert 'RESULT' not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
    return lines[0]


def config_file(tmp_path, body, name='cfg.py'):
    (tmp_path / name).write_text(textwrap.dedent(body))
    return name


def test_defaults_untouched(script):
    assert result(run(script)) == dict(batch_size=12, learning_rate=6e-4, compile=True, device='cuda',
                                       init_from=None, betas=(0.9, 0.95))


def test_overrides_of_each_type(script):
    proc = run(script, '--batch_size=32', '--learning_rate=1e-3', '--compile=False', '--device=cpu',
               '--init_from=gpt2', '--betas=(0.8,0.99)')
    got = result(proc)
    assert got == dict(batch_size=32, learning_rate=1e-3, compile=False, device='cpu', init_from='gpt2',
                       betas=(0.8, 0.99))
    assert type(got['batch_size']) is int and type(got['compile']) is bool
    assert 'Overriding: batch_size = 32' in proc.stdout


def test_int_for_float_becomes_float(script):
    got = result(run(script, '--learning_rate=1'))
    assert got['learning_rate'] == 1.0 and type(got['learning_rate']) is float


def test_none_default_takes_any_type(script):
    assert result(run(script, '--init_from=5'))['init_from'] == 5
    assert result(run(script, '--init_from=None'))['init_from'] is None


@pytest.mark.parametrize('text', ['cpu', 'cuda:1', 'data/shakespeare_char', 'https://example.com/a.txt', ''])
def test_bare_word_stays_string(script, text):
    assert result(run(script, f'--device={text}'))['device'] == text


def test_quoted_string(script):
    assert result(run(script, '--device="mps"'))['device'] == 'mps'


def test_config_file_then_override(script, tmp_path):
    cfg = config_file(tmp_path, """
        import math  # modules, helpers and _private names in a config file are not settings
        def _helper(x):
            return 2 * x
        batch_size = _helper(32)
        device = 'mps'
        learning_rate = math.sqrt(1e-6)
    """)
    proc = run(script, cfg, '--batch_size=8')
    got = result(proc)
    assert got['batch_size'] == 8  # the flag after the file wins
    assert got['device'] == 'mps' and got['learning_rate'] == pytest.approx(1e-3)
    assert f'Overriding config with {cfg}' in proc.stdout


def test_unknown_key_names_closest(script):
    msg = error(run(script, '--batch_sise=3'))
    assert "'batch_sise'" in msg and "'batch_size'" in msg


def test_private_and_module_names_are_not_settings(script):
    assert "'_private'" in error(run(script, '--_private=x'))
    assert "'os'" in error(run(script, '--os=x'))


@pytest.mark.parametrize('arg', ['--batch_size=abc', '--batch_size=1.5', '--compile=1', '--compile=yes',
                                 '--learning_rate=True', '--betas=[0.9,0.95]', '--device=3',
                                 '--betas={[]: 1}'])
def test_wrong_type(script, arg):
    key = arg[2:].split('=')[0]
    msg = error(run(script, arg))
    assert f"'{key}'" in msg


def test_missing_equals(script):
    assert '--batch_size' in error(run(script, '--batch_size'))


def test_missing_config_file(script):
    assert 'nope.py' in error(run(script, 'nope.py'))


def test_unknown_setting_in_config_file(script, tmp_path):
    cfg = config_file(tmp_path, "batch_size = 4\nlearnin_rate = 1e-3\n")
    msg = error(run(script, cfg))
    assert "'learnin_rate'" in msg and cfg in msg and "'learning_rate'" in msg


def test_broken_config_file(script, tmp_path):
    cfg = config_file(tmp_path, "batch_size = (\n")
    assert cfg in error(run(script, cfg))
    cfg = config_file(tmp_path, "batch_size = 1 / 0\n", name='div.py')
    assert 'ZeroDivisionError' in error(run(script, cfg))


@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_help_lists_settings_and_exits(script, flag):
    proc = run(script, '--batch_size=3', flag)
    assert proc.returncode == 0, proc.stderr
    assert 'RESULT' not in proc.stdout  # the script stops after the help
    for line in ['--batch_size=12', '--learning_rate=0.0006', '--compile=True', "--device='cuda'",
                 '--init_from=None', '--betas=(0.9, 0.95)']:
        assert line in proc.stdout
    assert '_private' not in proc.stdout and '--os=' not in proc.stdout


PY_CONFIG = "batch_size = 32\nlearning_rate = 6e-5\ncompile = False\ndevice = 'cpu'\nbetas = (0.8, 0.99)\n"


@pytest.mark.parametrize('name, body', [
    ('cfg.yaml', "# a comment\nbatch_size: 32\nlearning_rate: 6e-5\ncompile: false\ndevice: cpu\nbetas: [0.8, 0.99]\n"),
    ('cfg.yml', "batch_size: 32\nlearning_rate: 0.00006\ncompile: no\ndevice: 'cpu'\nbetas:\n  - 0.8\n  - 0.99\n"),
    ('cfg.json', '{"batch_size": 32, "learning_rate": 6e-5, "compile": false, "device": "cpu", "betas": [0.8, 0.99]}'),
])
def test_yaml_and_json_configs_equal_python_one(script, tmp_path, name, body):
    want = result(run(script, config_file(tmp_path, PY_CONFIG)))
    got = result(run(script, config_file(tmp_path, body, name=name)))
    assert got == want and type(got['learning_rate']) is float and type(got['betas']) is tuple
    # a flag after the file still wins
    assert result(run(script, name, '--batch_size=4'))['batch_size'] == 4


@pytest.mark.parametrize('name, body, words', [
    ('a.yaml', "batch_size: 32\nlearnin_rate: 1e-3\n", ["'learnin_rate'", "'learning_rate'"]),
    ('b.yaml', "batch_size: thirty\n", ["'batch_size'", 'expects int']),
    ('c.yaml', "compile: 1\n", ["'compile'", 'expects bool']),
    ('d.json', '{"batch_size": 1.5}', ["'batch_size'", 'expects int']),
    ('e.json', '{"batch_size": ', ['not valid JSON']),
    ('f.yaml', "batch_size: [1, 2\n", ['not valid YAML']),
    ('g.yaml', "- batch_size\n- 3\n", ['must map setting names']),
    ('h.json', '{"device": {"a": 1}}', ["'device'", 'expects str']),
])
def test_bad_yaml_and_json_configs_are_one_line(script, tmp_path, name, body, words):
    msg = error(run(script, config_file(tmp_path, body, name=name)))
    assert name in msg and all(w in msg for w in words), msg


def test_missing_yaml_config(script):
    assert 'nope.yaml' in error(run(script, 'nope.yaml'))


def test_random_yaml_and_json_files_are_typed_or_one_line(tmp_path):
    """Seeded random config files against the settings' types: each value is either taken with the type of
    its default (an int for a float becomes a float, a list for a tuple a tuple) or refused with a ValueError
    naming the setting; nothing else escapes."""
    import json
    import random
    from configurator import data_file_settings
    settings = dict(batch_size=12, learning_rate=6e-4, compile=True, device='cuda', init_from=None, betas=(0.9, 0.95))
    values = [0, -3, 2 ** 70, 1.5, -0.0, 1e-5, True, False, None, 'cpu', '', '6e-4', 'yes', [1, 2], [0.8, 'x'], {'a': 1}, []]
    rng = random.Random(7)
    for i in range(300):
        body = {rng.choice(list(settings)): rng.choice(values) for _ in range(rng.randint(1, 4))}
        path = tmp_path / f'c{i}.{rng.choice(["json", "yaml"])}'
        path.write_text(json.dumps(body))  # JSON is YAML too
        try:
            got = data_file_settings(str(path), settings)
        except ValueError as e:
            assert '\n' not in str(e) and any(f"'{k}'" in str(e) for k in body), e
            continue
        assert set(got) == set(body)
        for k, v in got.items():
            default = settings[k]
            assert default is None or type(v) is type(default), (k, v)
