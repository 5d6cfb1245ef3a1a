"""The call-based test harness: runs inside the sandbox, a program first and then its tests, in one interpreter.

Two ways a program used to pass tests it fails, both closed here:

- **Ending the check early.** ``raise SystemExit(0)``, ``sys.exit()``, ``os._exit(0)``, or a crash of the
  interpreter after the program's output: the process ends "successfully" before an assert ran. The harness reads a
  one-time secret (the nonce, on stdin) before the program runs, and writes ``r1-verdict <nonce>`` only after the
  last test returned; a run without that line has not passed, whatever its exit status. ``SystemExit`` raised by the
  program at its top level or inside a test is caught and reported (exit status ``EXITED_EARLY``).
- **Values that lie.** An object whose ``__eq__`` always returns True (or ``__bool__``, ``__lt__``, ``__contains__``,
  ``__sub__`` ...) passes ``assert f(x) == y``. The tests' code is rewritten (``rewrite.py``) so that every comparison,
  truth test and arithmetic operator runs in the harness's own functions, which accept only *trusted* values: those
  of builtin types implemented in C (``int``, ``float``, ``str``, ``bytes``, ``list``, ``tuple``, ``dict``, ``set``
  ... and ``Decimal``, the ``datetime`` types, ``deque``, ``OrderedDict``, ``defaultdict``), compared by exact type,
  containers checked element by element. A program's object, or a subclass of a builtin, fails the test with exit
  status ``UNTRUSTED_VALUE``. ``is`` / ``is not`` compare identity, which no object can change, and stay as written.

What is out of reach of any in-process check: a program written to attack this harness from the inside (walking the
interpreter's frames or heap to find the nonce or rewrite these functions). Such a program has to know this file;
policies that probe it show up as ``exited_early`` / ``untrusted_value`` counts long before.

Standard library only, Python 3.8+ (it runs on the sandbox's interpreter, not the virtualenv's):
``python -I -S harness.py PROGRAM TESTS``.
"""

import os
import sys

EXITED_EARLY = 86  # the program (or a test) raised SystemExit before the last test returned
UNTRUSTED_VALUE = 87  # a test compared, tested or computed with a value of a type that can lie

# Captured before the program runs: it may rebind builtins, not these references.
_type, _len, _id, _bool, _list, _set = type, len, id, bool, list, set
_dict_items, _getattr, _range, _write, _exit = dict.items, getattr, range, os.write, os._exit
_BaseException, _SystemExit = BaseException, SystemExit


def _trusted_types():
    import collections
    import datetime
    import decimal

    atoms = (type(None), bool, int, float, complex, str, bytes, bytearray, range, type(Ellipsis), decimal.Decimal,
             datetime.date, datetime.datetime, datetime.time, datetime.timedelta, datetime.timezone)
    sequences = (list, tuple, set, frozenset, collections.deque)
    mappings = (dict, collections.OrderedDict, collections.defaultdict)
    return atoms, sequences, mappings


_ATOMS, _SEQUENCES, _MAPPINGS = _trusted_types()
_MAX_ITEMS = 10_000_000


class UntrustedValue(Exception):
    pass


def _is(t, types):
    for candidate in types:  # identity only: ``in`` would call a metaclass's __eq__
        if t is candidate:
            return True
    return False


def _check(value):
    """``value`` if it is built only of trusted types, else UntrustedValue (iteratively: a deep or cyclic value
    cannot exhaust the stack)."""
    stack, seen, items = [value], _set(), 0
    while stack:
        v = stack.pop()
        t = _type(v)
        items += 1
        if items > _MAX_ITEMS:
            raise UntrustedValue(f"a value of more than {_MAX_ITEMS} items")
        if _is(t, _ATOMS):
            continue
        if not (_is(t, _SEQUENCES) or _is(t, _MAPPINGS)):
            name = f"{_getattr(t, '__module__', '?')}.{_getattr(t, '__qualname__', '?')}"
            raise UntrustedValue(f"a test used a value of type {name}: only builtin values are compared")
        if _id(v) in seen:
            continue
        seen.add(_id(v))
        if _is(t, _MAPPINGS):
            if t is _MAPPINGS[2] and v.default_factory is not None:  # (a lookup of a missing key calls it)
                raise UntrustedValue("a test compared a defaultdict with a default_factory")
            for key, item in _dict_items(v):
                stack.append(key)
                stack.append(item)
        else:
            stack.extend(_list(v))
    return value


def _compare(left, *ops_and_thunks):
    """``left op1 right1 op2 right2 ...`` with Python's chaining and short-circuit; every operand checked."""
    _check(left)
    for i in _range(0, _len(ops_and_thunks), 2):
        op, right = ops_and_thunks[i], _check(ops_and_thunks[i + 1]())
        if not _COMPARE[op](left, right):
            return False
        left = right
    return True


def _truth(value):
    return _bool(_check(value))


def _not(value):
    return not _truth(value)


def _and(*thunks):
    value = True
    for thunk in thunks:
        value = thunk()
        if not _truth(value):
            return value
    return value


def _or(*thunks):
    value = False
    for thunk in thunks:
        value = thunk()
        if _truth(value):
            return value
    return value


def _binop(op, left, right):
    return _BINOPS[op](_check(left), _check(right))


def _unaryop(op, operand):
    return _UNARYOPS[op](_check(operand))


def _operators():
    import operator

    compare = {"Eq": operator.eq, "NotEq": operator.ne, "Lt": operator.lt, "LtE": operator.le, "Gt": operator.gt,
               "GtE": operator.ge, "In": lambda a, b: a in b, "NotIn": lambda a, b: a not in b,
               "Is": operator.is_, "IsNot": operator.is_not}
    binops = {"Add": operator.add, "Sub": operator.sub, "Mult": operator.mul, "Div": operator.truediv,
              "FloorDiv": operator.floordiv, "Mod": operator.mod, "Pow": operator.pow, "LShift": operator.lshift,
              "RShift": operator.rshift, "BitOr": operator.or_, "BitXor": operator.xor, "BitAnd": operator.and_,
              "MatMult": operator.matmul}
    unary = {"USub": operator.neg, "UAdd": operator.pos, "Invert": operator.invert}
    return compare, binops, unary


_COMPARE, _BINOPS, _UNARYOPS = _operators()
HELPERS = {"__r1_compare__": _compare, "__r1_truth__": _truth, "__r1_not__": _not, "__r1_and__": _and,
           "__r1_or__": _or, "__r1_binop__": _binop, "__r1_unaryop__": _unaryop}  # (dunder-ended: never mangled)


def main():
    nonce = sys.stdin.readline().strip()
    sys.stdin = open(os.devnull)  # noqa: SIM115 - the program reads no more of it: input() is EOF
    os.dup2(sys.stdin.fileno(), 0)
    verdict_fd = os.dup(1)
    program_path, tests_path = sys.argv[1], sys.argv[2]
    with open(tests_path) as f:
        tests = compile(f.read(), "<tests>", "exec")  # (rewritten by r1/rewards/rewrite.py) before the program runs
    with open(program_path) as f:
        program = compile(f.read(), program_path, "exec")

    import types

    module = types.ModuleType("__main__")  # the program's own __main__: this file's globals are not reachable there
    module.__file__, module.__builtins__ = program_path, __builtins__
    sys.modules["__main__"] = module
    sys.argv = [program_path]
    stage = "the program"
    try:
        exec(program, module.__dict__)  # noqa: S102 - in the sandbox, which is what it is for
        stage = "its tests"
        namespace = dict(module.__dict__)
        namespace.update(HELPERS)
        exec(tests, namespace)  # noqa: S102
    except _SystemExit as err:
        _write(2, f"r1 harness: {stage} raised SystemExit({err.code!r}) before the tests finished: not passed\n"
               .encode())
        _exit(EXITED_EARLY)
    except UntrustedValue as err:
        _write(2, f"r1 harness: {err}\n".encode())
        _exit(UNTRUSTED_VALUE)
    except _BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        _exit(1)
    sys.stdout.flush()
    _write(verdict_fd, f"\nr1-verdict {nonce}\n".encode())
    _exit(0)


if __name__ == "__main__":
    main()
