"""Test-only patch: the Triton interpreter runs a launch's program instances in a shuffled order.

The interpreter (triton/runtime/interpreter.py, ``GridExecutor.__call__``) runs the programs of a
launch one after another in grid order, x outermost. A kernel whose result depends on the order in
which programs run — float atomics, one program reading what another wrote in the same launch,
two programs writing one location — is then still deterministic under the interpreter, so a
run-twice test cannot catch it. With ``shuffled_program_order(seed)`` every launch runs its
programs in a seeded random permutation of the whole grid (all axes together); a kernel is
order-independent exactly when every permutation gives bitwise the same result, which a GPU,
scheduling programs in any order, needs for run-to-run determinism.

The patch rewrites the grid loop of ``GridExecutor.__call__`` from its source; if a Triton version
changes that loop, ``shuffled_program_order`` raises instead of silently running in grid order.
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import random
import re
import textwrap

LOOP = re.compile(
    r"(?P<indent>[ \t]*)for x in range\(grid\[0\]\):\n"
    r"[ \t]*for y in range\(grid\[1\]\):\n"
    r"[ \t]*for z in range\(grid\[2\]\):\n"
    r"[ \t]*interpreter_builder\.set_grid_idx\(x, y, z\)\n"
    r"[ \t]*self\.fn\(\*\*args\)\n")


class ProgramOrder:
    """Yields the (x, y, z) program ids of each launch in a seeded random order (never grid order
    when there are several programs) and records, per launch, the kernel's name, the grid and
    whether the order differed from grid order."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.launches: list[tuple[str, tuple, bool]] = []

    def __call__(self, fn, grid):
        ids = list(itertools.product(range(grid[0]), range(grid[1]), range(grid[2])))
        order = ids[:]
        self.rng.shuffle(order)
        if order == ids:  # likely with 2 or 3 programs: every multi-program launch must move
            order.reverse()
        self.launches.append((getattr(fn, "__name__", repr(fn)), tuple(grid), order != ids))
        return order

    @property
    def shuffled_launches(self) -> int:
        return sum(moved for _, _, moved in self.launches)


def _patched_call(order: ProgramOrder):
    from triton.runtime import interpreter

    source = textwrap.dedent(inspect.getsource(interpreter.GridExecutor.__call__))
    match = LOOP.search(source)
    if match is None:
        raise RuntimeError("triton's GridExecutor.__call__ no longer has the grid loop this patch "
                           "rewrites (tests/interpreter_order.py): update the pattern")
    indent = match.group("indent")
    replacement = (f"{indent}for x, y, z in _program_order(self.fn, grid):\n"
                   f"{indent}    interpreter_builder.set_grid_idx(x, y, z)\n"
                   f"{indent}    self.fn(**args)\n")
    source = source[:match.start()] + replacement + source[match.end():]
    namespace = dict(vars(interpreter), _program_order=order)
    exec(compile(source, interpreter.__file__, "exec"), namespace)
    return namespace["__call__"]


@contextlib.contextmanager
def shuffled_program_order(seed: int = 0):
    """Within the block, every interpreted Triton launch runs its programs in a shuffled order.
    Yields the ProgramOrder (its ``launches`` tell which launches had more than one program)."""
    from triton.runtime import interpreter

    order = ProgramOrder(seed)
    original = interpreter.GridExecutor.__call__
    interpreter.GridExecutor.__call__ = _patched_call(order)
    try:
        yield order
    finally:
        interpreter.GridExecutor.__call__ = original
