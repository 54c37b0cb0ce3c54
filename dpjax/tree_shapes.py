"""Comparing two pytrees of arrays by their leaves' names and shapes (a checkpoint against the
state it restores into, parameters against the network a config builds)."""

from typing import Any

import jax


def _dotted_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  # Dict keys, sequence indices and dataclass fields all become dotted names, as orbax's
  # metadata names them.
  def part(key) -> str:
    for attr in ('key', 'idx', 'name'):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  return {'.'.join(part(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def shape_differences(got: Any, expected: Any, *, got_name: str,
                      expected_name: str) -> list[str]:
  """How `got`'s leaves differ from `expected`'s in names and shapes, each as
  'opt_state.0.mu.noise_model.kernel: ...'; empty when they match. The names say what each
  tree is ('the checkpoint', 'this run')."""
  got, expected = _dotted_shapes(got), _dotted_shapes(expected)
  problems = [f'{name}: only in {got_name}' for name in got if name not in expected]
  problems += [f'{name}: only in {expected_name}' for name in expected if name not in got]
  problems += [f'{name}: shape {got[name]} in {got_name}, {shape} in {expected_name}'
               for name, shape in expected.items() if name in got and got[name] != shape]
  return problems


def summarize(problems: list[str], shown: int = 3) -> str:
  """The first `shown` problems, and how many there are in all."""
  more = f'; … ({len(problems)} in all)' if len(problems) > shown else ''
  return '; '.join(problems[:shown]) + more
