"""timm's own channel rule as a function of the width: traced once, evaluated in microseconds.

timm's EfficientNet-builder and MobileNetV3 generators derive every channel count from their
``channel_multiplier`` with a little integer arithmetic: ``make_divisible`` (through
``round_channels``), Python's ``round``, ``max`` and a few comparisons. Building the model at a
new multiplier (:func:`replay_timm_channels`, the reference) costs 40-80 ms of module
construction, too slow for a width that changes every training step.

So the generator runs once with a *symbolic* multiplier instead: a float that records on a tape
every arithmetic operation applied to it and to the numbers computed from it, with timm's
``make_divisible`` and Python's ``int`` as single steps (they are called, not re-implemented).
Every comparison or truth test of such a number is a *guard*: the outcome it had is recorded.
The steps that lead to each conv/linear's ``out_channels`` (and to the guards) are compiled
into one Python function of the width. Evaluating it at another width is exact whenever every
guard has the same outcome there, because timm's code then takes the same branches. Where a
guard differs (MobileNetV3's stem is fixed below 0.75, a narrow block loses its skip), the
generator is traced again at that width and the new function joins the others; a width that
none fits after that is built for real. One rule per architecture is shared by every supernet
of it in the process (:func:`shared_rule`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import operator
import sys
import threading
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch.nn as nn
from timm.layers import helpers as timm_helpers

from .meta import meta_device

_REPLAY_LOCK = threading.Lock()
_MAKE_DIVISIBLE = timm_helpers.make_divisible
# Generator arguments that scale every channel count (tinynet calls its multiplier model_width,
# GhostNet's _create_ghostnet width).
_WIDTH_PARAMETERS = ('channel_multiplier', 'model_width', 'width')
_GENERATOR_PREFIXES = ('_gen_', '_create_')
# How many traced programs one architecture keeps before it falls back to building the model.
_MAX_PROGRAMS = 16
# Where a fresh trace is checked against a real build: the narrowest of these it applies to.
_CHECK_WIDTHS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


# -- building timm's model at a scaled multiplier ---------------------------------------------

def _width_parameter(fn: Callable) -> Optional[str]:
    """The argument of a timm generator that scales every channel count, if it has one."""
    parameters = inspect.signature(fn).parameters
    return next((name for name in _WIDTH_PARAMETERS if name in parameters), None)


def _scaled_generator(fn: Callable, factor: Any) -> Callable:
    signature, parameter = inspect.signature(fn), _width_parameter(fn)

    def generator(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        bound.arguments[parameter] = bound.arguments[parameter] * factor
        return fn(*bound.args, **bound.kwargs)

    return generator


def _generators(architecture: str) -> Tuple[Optional[Callable], Any, Dict[str, Callable]]:
    """timm's entrypoint of ``architecture``, its module, and the module's scalable generators."""
    import timm.models

    if not timm.models.is_model(architecture):
        return None, None, {}
    entrypoint = timm.models.model_entrypoint(architecture)
    module = sys.modules[entrypoint.__module__]
    generators = {
        name: fn for name, fn in vars(module).items()
        if name.startswith(_GENERATOR_PREFIXES) and callable(fn) and _width_parameter(fn) is not None
    }
    return entrypoint, module, generators


def _build_scaled(architecture: str, factor: Any, num_classes: int) -> Optional[Dict[str, Any]]:
    """``{conv/linear name: out_channels}`` of timm's ``architecture`` with its channel multiplier
    times ``factor``, built on the meta device; None when its generator has no multiplier."""
    entrypoint, module, generators = _generators(architecture)
    if not generators:
        return None
    try:
        for name, fn in generators.items():
            setattr(module, name, _scaled_generator(fn, factor))
        with meta_device():
            native = entrypoint(pretrained=False, num_classes=num_classes)
    finally:
        for name, fn in generators.items():
            setattr(module, name, fn)
    return {
        name: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        for name, m in native.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    }


def replay_timm_channels(architecture: str, width: float, num_classes: int) -> Optional[Dict[str, int]]:
    """Output channels of every conv/linear of timm's ``architecture`` built at ``width`` times
    its channel multiplier, or None when its module's generators have no multiplier.

    The reference the traced rule is checked against (it builds the whole model: 40-80 ms)."""
    with _REPLAY_LOCK:
        return _build_scaled(architecture, width, num_classes)


# -- symbolic numbers ---------------------------------------------------------------------------

class _Ref:
    """An argument of a tape step that is the value of an earlier step."""

    __slots__ = ('index',)

    def __init__(self, index: int) -> None:
        self.index = index


class _Tape:
    """Steps ``value[i] = fn(*args)`` from the width (step 0) and the guards on them."""

    def __init__(self) -> None:
        self.steps: List[Tuple[Optional[Callable], tuple]] = [(None, ())]
        self.guards: List[Tuple[int, Any]] = []

    def add(self, fn: Callable, args: tuple) -> int:
        self.steps.append((fn, tuple(_Ref(a._index) if isinstance(a, _SYMBOLIC) else a for a in args)))
        return len(self.steps) - 1


def _plain(value: Any) -> Any:
    return value._value if isinstance(value, _SYMBOLIC) else value


def _tape_of(args: tuple) -> _Tape:
    return next(a._tape for a in args if isinstance(a, _SYMBOLIC))


def _apply(fn: Callable, args: tuple) -> Any:
    """Compute ``fn(*args)`` on the plain values and record it; the result stays symbolic."""
    result = fn(*(_plain(a) for a in args))
    tape = _tape_of(args)
    index = tape.add(fn, args)   # no recorded operation returns a bool: comparisons are guards
    if isinstance(result, int):
        return SymInt(result, tape, index)
    if isinstance(result, float):
        return SymFloat(result, tape, index)
    return result


def _guard(fn: Callable, args: tuple) -> Any:
    """A comparison or truth test: its outcome is recorded and must hold wherever the program runs."""
    result = fn(*(_plain(a) for a in args))
    tape = _tape_of(args)
    tape.guards.append((tape.add(fn, args), result))
    return result


def _binary(fn: Callable) -> Tuple[Callable, Callable]:
    def forward(self, other):
        if not isinstance(other, numbers.Number):
            return NotImplemented
        return _apply(fn, (self, other))

    def reflected(self, other):
        if not isinstance(other, numbers.Number):
            return NotImplemented
        return _apply(fn, (other, self))

    return forward, reflected


def _comparison(fn: Callable) -> Callable:
    def compare(self, other):
        if not isinstance(other, numbers.Number):
            return NotImplemented
        return _guard(fn, (self, other))

    return compare


class _Symbolic:
    """Arithmetic that records itself; mixed into ``int`` and ``float`` below."""

    __slots__ = ()

    __add__, __radd__ = _binary(operator.add)
    __sub__, __rsub__ = _binary(operator.sub)
    __mul__, __rmul__ = _binary(operator.mul)
    __truediv__, __rtruediv__ = _binary(operator.truediv)
    __floordiv__, __rfloordiv__ = _binary(operator.floordiv)
    __mod__, __rmod__ = _binary(operator.mod)
    __pow__, __rpow__ = _binary(operator.pow)
    __lt__ = _comparison(operator.lt)
    __le__ = _comparison(operator.le)
    __gt__ = _comparison(operator.gt)
    __ge__ = _comparison(operator.ge)
    __eq__ = _comparison(operator.eq)
    __ne__ = _comparison(operator.ne)

    def __neg__(self):
        return _apply(operator.neg, (self,))

    def __pos__(self):
        return self

    def __abs__(self):
        return _apply(abs, (self,))

    def __bool__(self):
        return _guard(bool, (self,))

    def __round__(self, ndigits=None):
        return _apply(round, (self, ndigits))   # round(x, None) is round(x)

    def __floor__(self):
        return _apply(math.floor, (self,))

    def __ceil__(self):
        return _apply(math.ceil, (self,))

    def __hash__(self):
        return hash(self._value)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self   # timm deep-copies modules while it builds some models (the pruned EfficientNets)


class SymInt(_Symbolic, int):
    """An int computed from the symbolic width (see the module docstring)."""

    def __new__(cls, value: int, tape: _Tape, index: int) -> SymInt:
        obj = int.__new__(cls, value)
        obj._value, obj._tape, obj._index = value, tape, index
        return obj


class SymFloat(_Symbolic, float):
    """A float computed from the symbolic width (see the module docstring)."""

    def __new__(cls, value: float, tape: _Tape, index: int) -> SymFloat:
        obj = float.__new__(cls, value)
        obj._value, obj._tape, obj._index = value, tape, index
        return obj


_SYMBOLIC = (SymInt, SymFloat)


def _symbolic_make_divisible(v, divisor=8, min_value=None, round_limit=.9):
    args = (v, divisor, min_value, round_limit)
    if any(isinstance(a, _SYMBOLIC) for a in args):
        return _apply(_MAKE_DIVISIBLE, args)
    return _MAKE_DIVISIBLE(*args)


def _symbolic_int(value=0, *args):
    """``int()`` that keeps a symbolic number symbolic (Python's own must return a plain int)."""
    if isinstance(value, _SYMBOLIC) and not args:
        return _apply(int, (value,))
    return int(value, *args)


@contextlib.contextmanager
def _symbolic_timm() -> Iterator[None]:
    """While tracing, timm's modules call the symbolic ``make_divisible`` and ``int`` (both behave
    exactly like the originals on plain numbers, so another thread building a model is unaffected)."""
    patched = []
    for name, module in list(sys.modules.items()):
        if not name.startswith('timm.') or module is None:
            continue
        names = vars(module)
        if names.get('make_divisible') is _MAKE_DIVISIBLE:
            module.make_divisible = _symbolic_make_divisible
            patched.append((module, 'make_divisible'))
        if 'int' not in names:
            module.int = _symbolic_int
            patched.append((module, 'int'))
    try:
        yield
    finally:
        for module, attribute in patched:
            if attribute == 'int':
                del module.int
            else:
                module.make_divisible = _MAKE_DIVISIBLE


# -- the traced programs ------------------------------------------------------------------------

class _Program:
    """One traced path through timm's generator, compiled to a Python function of the width.

    Only the steps that reach a layer's count or a guard are kept. They become straight-line
    code (``v3 = f3(v1, 8, None, 0.9)``; ``if v4 != False: return None``), compiled once, the way
    ``torch.fx`` turns a graph into code: a tape walked step by step in Python costs 0.3-0.6 ms
    per width, the compiled function a tenth of that.
    """

    def __init__(self, tape: _Tape, outputs: Sequence[Any]) -> None:
        needed = set()
        pending = [o._index for o in outputs if isinstance(o, _SYMBOLIC)] + [i for i, _ in tape.guards]
        while pending:
            index = pending.pop()
            if index in needed or index == 0:
                continue
            needed.add(index)
            pending.extend(a.index for a in tape.steps[index][1] if isinstance(a, _Ref))
        outcomes = dict(tape.guards)
        namespace: Dict[str, Any] = {}
        lines = ['def program(v0):']
        for index in sorted(needed):
            fn, args = tape.steps[index]
            namespace[f'f{index}'] = fn
            names = []
            for position, arg in enumerate(args):
                if isinstance(arg, _Ref):
                    names.append(f'v{arg.index}')
                else:
                    namespace[f'c{index}_{position}'] = arg
                    names.append(f'c{index}_{position}')
            lines.append(f'    v{index} = f{index}({", ".join(names)})')
            if index in outcomes:
                namespace[f'g{index}'] = outcomes[index]
                lines.append(f'    if v{index} != g{index}: return None')
        results = []
        for position, output in enumerate(outputs):
            if isinstance(output, _SYMBOLIC):
                results.append(f'v{output._index}')
            else:
                namespace[f'o{position}'] = int(output)
                results.append(f'o{position}')
        lines.append(f'    return [{", ".join(results)}]')
        exec(compile('\n'.join(lines), f'<timm channel rule {len(needed)} steps>', 'exec'), namespace)
        self.evaluate: Callable[[float], Optional[List[int]]] = namespace['program']
        self.depends_on_width = any(isinstance(output, _SYMBOLIC) for output in outputs)


class TimmChannelRule:
    """timm's channel counts of one architecture at any width (uniform multiple of its multiplier).

    ``names`` lists every conv/linear; :meth:`counts` returns their output counts at a width, in
    that order, equal to what :func:`replay_timm_channels` reads from the built model.
    """

    def __init__(self, architecture: str, num_classes: int, names: List[str], program: _Program,
                 max_programs: int = _MAX_PROGRAMS) -> None:
        self.architecture = architecture
        self.num_classes = num_classes
        self.names = names
        self.programs = [program]
        self.max_programs = max_programs
        self._built: OrderedDict = OrderedDict()   # widths no program fits, built for real (LRU)
        self.max_built = 256

    @classmethod
    def trace(cls, architecture: str, num_classes: int, max_programs: int = _MAX_PROGRAMS) -> Optional[TimmChannelRule]:
        """Trace timm's generator of ``architecture`` at full width; None when it has no
        ``channel_multiplier`` (or tinynet's ``model_width``), when no count depends on it
        (the pruned EfficientNets read their channels from a file; other generators of the
        module are scaled, not the one the entrypoint calls).

        The trace is checked once against a real build at the narrowest of a few widths where it
        applies: a count that timm computes in a way the trace cannot follow (a conversion to a
        plain number, say) would show there as a mismatch, and the rule then builds every width
        for real (exact, as slow as before) and warns."""
        traced = _trace(architecture, num_classes, 1.0)
        if traced is None:
            return None
        names, program = traced
        if not program.depends_on_width:
            return None
        rule = cls(architecture, num_classes, names, program, max_programs)
        for width in _CHECK_WIDTHS:
            counts = program.evaluate(width)
            if counts is None:
                continue
            built = replay_timm_channels(architecture, width, num_classes)
            if [built[name] for name in names] != counts:
                warnings.warn(f'timm_slim: the traced channel rule of {architecture} does not reproduce timm at '
                              f'width {width}; every new width will be built (40-80 ms each)', stacklevel=2)
                rule.programs, rule.max_programs = [], 0
            break
        return rule

    def __deepcopy__(self, memo: dict) -> TimmChannelRule:
        return self   # a function of the architecture alone, shared by every copy of a supernet

    def __reduce__(self):
        return shared_rule, (self.architecture, self.num_classes)   # compiled programs do not pickle

    def counts(self, width: float) -> List[int]:
        """Output channels of every layer in ``names`` at ``width``."""
        for program in self.programs:
            counts = program.evaluate(width)
            if counts is not None:
                return counts
        if len(self.programs) < self.max_programs:
            traced = _trace(self.architecture, self.num_classes, width)
            if traced is not None and traced[0] == self.names:
                self.programs.append(traced[1])
                counts = traced[1].evaluate(width)
                if counts is not None:
                    return counts
        return self._build(width)

    def _build(self, width: float) -> List[int]:
        if width not in self._built:
            built = replay_timm_channels(self.architecture, width, self.num_classes)
            self._built[width] = [built[name] for name in self.names]
            if len(self._built) > self.max_built:
                self._built.popitem(last=False)
        self._built.move_to_end(width)
        return self._built[width]


_RULES: OrderedDict = OrderedDict()
_RULES_LOCK = threading.Lock()
_MAX_RULES = 32


def shared_rule(architecture: str, num_classes: int) -> Optional[TimmChannelRule]:
    """The rule of ``architecture`` (traced on first use, then shared by every supernet of it in
    this process; the 32 most recently used architectures are kept)."""
    key = (architecture, num_classes)
    with _RULES_LOCK:
        if key in _RULES:
            _RULES.move_to_end(key)
            return _RULES[key]
    rule = TimmChannelRule.trace(architecture, num_classes)
    with _RULES_LOCK:
        rule = _RULES.setdefault(key, rule)
        while len(_RULES) > _MAX_RULES:
            _RULES.popitem(last=False)
    return rule


def _trace(architecture: str, num_classes: int, width: float) -> Optional[Tuple[List[str], _Program]]:
    tape = _Tape()
    factor = SymFloat(width, tape, 0)
    with _REPLAY_LOCK, _symbolic_timm():
        built = _build_scaled(architecture, factor, num_classes)
    if built is None:
        return None
    names = list(built)
    return names, _Program(tape, [built[n] for n in names])
