"""
Settings for every script: plain globals at the top of the script, overridden by

    python train.py config/some_config.py --batch_size=32 --compile=False

A script defines its settings, then calls configure(globals()). Config files are
plain Python, exec'd in the script's namespace, or .yaml / .json files of key: value (a run's
config.yaml, which every training script writes beside its checkpoint, reruns that run). Each
--key=value, and each value in a YAML or JSON file, is parsed with
ast.literal_eval (a bare word such as --device=cpu stays a string) and must have
the same type as the default (an int where a float is expected is fine).
Anything wrong stops the script before it does any work: one line, exit code 1.
`--help` prints every setting with its current value.
"""
import ast
import difflib
import json
import os
import sys

SETTING_TYPES = (bool, int, float, str, tuple, list, type(None))


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def closest(key, known):
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return text  # a bare word like --device=cpu (or anything else that is not a literal)


def type_ok(default, value):
    if default is None or type(value) is type(default):
        return True
    # an int where a float is expected is fine; bools are not ints here
    return isinstance(default, float) and type(value) is int


def check_value(settings, key, text):
    """The value that --key=text gives setting `key` of `settings` (name -> default), or a
    ValueError saying what is wrong with it."""
    if key not in settings:
        raise ValueError(f"unknown setting '{key}'{closest(key, list(settings))}")
    value = parse_value(text)
    if not type_ok(settings[key], value):
        raise ValueError(f"setting '{key}' expects {type(settings[key]).__name__}, got {type(value).__name__} '{text}'")
    return float(value) if isinstance(settings[key], float) else value


def data_file_settings(path, settings):
    """The settings a .yaml or .json config file sets, typed as --key=value would type them; a ValueError
    saying what is wrong. YAML comes from PyYAML, which transformers already requires."""
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith('.json'):
            values = json.loads(text)
        else:
            import yaml
            values = yaml.safe_load(text) or {}
    except Exception as e:
        raise ValueError(f"config file '{path}' is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                         f"{' '.join(str(e).split())[:200]}")
    if not isinstance(values, dict):
        raise ValueError(f"config file '{path}' must map setting names to values, not a {type(values).__name__}")
    typed = {}
    for key, value in values.items():
        key = str(key)
        if key not in settings:
            raise ValueError(f"unknown setting '{key}' in {path}{closest(key, list(settings))}")
        default = settings[key]
        if isinstance(default, float) and isinstance(value, str):
            try:  # YAML 1.1 reads 6e-4 (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)  # neither format has tuples
        if not type_ok(default, value) or not isinstance(value, SETTING_TYPES):
            raise ValueError(f"setting '{key}' in {path} expects {type(default).__name__}, "
                             f"got {type(value).__name__} {value!r}"[:300])
        typed[key] = float(value) if isinstance(default, float) else value
    return typed


def write_settings(path, settings, script):
    """A run's resolved settings as config.yaml (atomically): `python <script> <path>` runs them again."""
    import yaml
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(f"# the settings of this run: python {script} {path} reruns them\n")
        yaml.safe_dump(dict(settings), f, sort_keys=False, default_flow_style=False)
    os.replace(tmp, path)


def settings_in(path):
    """A script's settings and their defaults, read from its source without running it: the
    plain assignments before its configure(globals()) call (serve.py checks a training run's
    overrides against train.py's)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    settings = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and 'configure(' in ast.unparse(node):
            break
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value.body if isinstance(node.value, ast.IfExp) else node.value  # dtype = 'a' if .. else 'b'
            try:
                settings[node.targets[0].id] = ast.literal_eval(value)
            except ValueError:
                # arithmetic on literals (gradient_accumulation_steps = 5 * 8) is a default too
                if all(isinstance(n, (ast.BinOp, ast.UnaryOp, ast.Constant, ast.operator, ast.unaryop))
                       for n in ast.walk(value)):
                    settings[node.targets[0].id] = eval(compile(ast.Expression(value), path, 'eval'), {'__builtins__': {}})
    return settings


def configure(settings, argv=None):
    """Apply config files and --key=value overrides in argv to the dict `settings` (a script's globals())."""
    argv = sys.argv[1:] if argv is None else argv
    known = sorted(k for k, v in settings.items() if not k.startswith('_') and isinstance(v, SETTING_TYPES))
    if any(arg in ('-h', '--help') for arg in argv):
        print(f"usage: python {sys.argv[0]} [config/file.py ...] [--key=value ...]\nsettings and their defaults:")
        for k in known:
            print(f"  --{k}={settings[k]!r}")
        sys.exit(0)
    for arg in argv:
        if not arg.startswith('--') and arg.endswith(('.yaml', '.yml', '.json')):
            try:
                settings.update(data_file_settings(arg, {k: settings[k] for k in known}))
            except OSError:
                fail(f"config file '{arg}' not found")
            except ValueError as e:
                fail(str(e))
            print(f"Overriding config with {arg}")
            continue
        if not arg.startswith('--'):
            # a Python config file: exec it, then check it only set known settings
            try:
                with open(arg) as f:
                    source = f.read()
            except OSError:
                fail(f"config file '{arg}' not found")
            scratch = dict(settings)
            try:
                exec(compile(source, arg, 'exec'), scratch)
            except Exception as e:
                fail(f"config file '{arg}' failed: {type(e).__name__}: {e}")
            for k, v in scratch.items():
                if k.startswith('_') or not isinstance(v, SETTING_TYPES):
                    continue  # modules, helper functions and private names are not settings
                if k not in settings:
                    fail(f"unknown setting '{k}' in {arg}{closest(k, known)}")
                settings[k] = v
            print(f"Overriding config with {arg}")
            continue
        key, sep, text = arg[2:].partition('=')
        if not sep:
            fail(f"expected --key=value, got '{arg}'")
        try:
            value = check_value({k: settings[k] for k in known}, key, text)
        except ValueError as e:
            fail(str(e))
        print(f"Overriding: {key} = {value!r}")
        settings[key] = value
