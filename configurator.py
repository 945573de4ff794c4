"""Override a script's config globals from config files and --key=value arguments (nanoGPT style).

A script sets its defaults as plain lowercase globals, then, in the same way in every script:

    config = configure(globals())      # from configurator import configure

and gets them overridden from sys.argv:

    python train.py config/train_config.py --batch_size=32 --compile=False

A bare argument is a config file (Python that assigns some of the keys); --key=value sets one
key. Keys must already exist, and a value must keep its default's type (an int may widen to
a float). Anything else exits with a message naming the key. configure returns the final values
as a dict, to print and to save in checkpoints. -h/--help prints the script's docstring and keys.

A key that was renamed is not kept as an alias: the script lists it in an uppercase global,

    RENAMED_KEYS = {"mode": "packing"}

and --mode=packed (or mode = "packed" in a config file) exits with a message naming the new key.
Where the values were renamed too, the entry is (new key, {old value: new value}), and the
message shows the new spelling of the value given.
"""
import ast
import builtins  # a script may have a config key named compile or input: builtins.compile is Python's
import sys


def _config_keys(g):
    return [k for k, v in g.items()
            if not k.startswith("_") and k.islower() and type(v) in (int, float, bool, str)]


def _coerce(key, default, value, origin):
    """value (a str from the command line, or any object from a config file) as default's type."""
    want = type(default)
    if isinstance(value, str) and want is not str:
        text = value.strip()
        if want is bool and text.lower() in ("true", "false", "1", "0"):
            return text.lower() in ("true", "1")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            sys.exit(f"{origin}: {key} expects {want.__name__}, got {text!r}")
    if want is float and type(value) is int:
        value = float(value)
    if type(value) is not want:
        sys.exit(f"{origin}: {key} expects {want.__name__} (default {default!r}), "
                  f"got {type(value).__name__} {value!r}")
    return value


def _renamed(g, key, value, origin, new_spelling):
    """Exit when key is an old name the script lists in RENAMED_KEYS; new_spelling(new key, value)
    shows the fix."""
    new = g.get("RENAMED_KEYS", {}).get(key)
    if new is not None:
        new, values = new if isinstance(new, tuple) else (new, {})
        sys.exit(f"{origin}: {key} was renamed: use {new_spelling(new, values.get(value, value))}")


def _apply_overrides(g, argv):
    keys = _config_keys(g)
    for arg in argv:
        if arg in ("-h", "--help"):
            print((g.get("__doc__") or "").strip() + "\n\nconfig keys and defaults:")
            for k in keys:
                print(f"  --{k}={g[k]!r}")
            sys.exit(0)
        if not arg.startswith("--"):
            try:
                with open(arg, encoding="utf-8") as f:
                    source = f.read()
            except OSError as e:
                sys.exit(f"config file {arg}: cannot read it ({e.strerror})")
            assigned = {"__file__": arg}
            exec(builtins.compile(source, arg, "exec"), assigned)
            for k, v in assigned.items():
                if k.startswith("_") or not k.islower() or callable(v) or isinstance(v, type(sys)):
                    continue
                _renamed(g, k, v, f"config file {arg}", lambda new, v: f"{new} = {v!r}")
                if k not in keys:
                    sys.exit(f"config file {arg}: unknown key {k!r}; known keys: {', '.join(keys)}")
                g[k] = _coerce(k, g[k], v, f"config file {arg}")
            print(f"configurator: applied {arg}")
            continue
        key, sep, value = arg[2:].partition("=")
        if not sep:
            sys.exit(f"argument {arg!r}: expected --key=value or a config file path")
        _renamed(g, key, value, f"argument {arg!r}", lambda new, v: f"--{new}={v}")
        if key not in keys:
            sys.exit(f"argument {arg!r}: unknown key {key!r}; known keys: {', '.join(keys)}")
        g[key] = _coerce(key, g[key], value, f"argument {arg!r}")
    return {k: g[k] for k in keys}


def configure(g: dict, argv: list | None = None) -> dict:
    """Apply argv (default sys.argv[1:]) to the script globals g in place; return the config dict."""
    return _apply_overrides(g, sys.argv[1:] if argv is None else argv)
