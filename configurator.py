"""
Settings for every script: plain globals at the top of the script, overridden by

    python train.py config/some_config.py --batch_size=32 --compile=False

A script defines its settings, then calls configure(globals()). Config files are
plain Python, exec'd in the script's namespace; each --key=value is parsed with
ast.literal_eval (a bare word such as --device=cpu stays a string) and must have
the same type as the default (an int where a float is expected is fine).
Anything wrong stops the script before it does any work: one line, exit code 1.
`--help` prints every setting with its current value.
"""
import ast
import difflib
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
        if not arg.startswith('--'):
            # a config file: exec it, then check it only set known settings
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
