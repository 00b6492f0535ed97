"""Samples for the interventions: one function resolves a task name to seeded samples of a split.

Tasks come from :mod:`attnlab.interventions.tasks` (the intervention tasks: ``make(tok, task, length, n, seed,
split)`` and ``TASKS``) when it is importable and knows the name, else from the long-context tasks of
:mod:`attnlab.plans.tasks` (``make_samples(tok, task, length, n, seed)``).

Splits (convention ``val-seed``): the ``test`` split of seed ``s`` is ``plans.tasks.make_samples(..., seed=s)``,
whose generators are seeded ``s * 1000 + i`` (``i < n``); the ``val`` split is the same call with seed
``s + VAL_OFFSET``, generator seeds ``(s + 1000) * 1000 + i``. With ``0 <= s < 1000`` and ``n <= 1000`` the two
never share a generator seed (:func:`check_split_seeds`); knobs are set on ``val`` and scored on ``test``.

A sample is anything with ``task``, ``ids`` (prompt token ids), ``answers``, ``max_new_tokens`` and
``score(text) -> float`` in [0, 1] (:class:`attnlab.plans.tasks.Sample`); :func:`sample_id` names it by its
prompt, so records of different arms can be checked to hold the same sample.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

SPLITS = ("test", "val")
#: the val split's seed offset (generator seeds ``(seed + 1000) * 1000 + i`` vs the test split's ``seed * 1000 + i``)
VAL_OFFSET = 1000
MAX_N = 1000


def _intervention_tasks() -> Any | None:
    try:
        from . import tasks
    except ImportError:
        return None
    return tasks if hasattr(tasks, "make") and hasattr(tasks, "TASKS") else None


def task_names() -> tuple[str, ...]:
    """Every task name :func:`make` resolves: the intervention tasks first, then the long-context tasks."""
    from ..plans.tasks import TASKS as LONG

    mod = _intervention_tasks()
    own = tuple(mod.TASKS) if mod is not None else ()
    return own + tuple(t for t in LONG if t not in own)


def check_split_seeds(seed: int, n: int) -> None:
    """The val and test splits of ``seed`` with ``n`` samples share no generator seed (see the module doc)."""
    if not 0 <= seed < VAL_OFFSET:
        raise ValueError(f"seed must be in [0, {VAL_OFFSET}) so that the val split stays apart, got {seed}")
    if not 1 <= n <= MAX_N:
        raise ValueError(f"n must be in [1, {MAX_N}] (samples per split), got {n}")


def make(tok: Any, task: str, length: int, n: int, seed: int = 0, split: str = "test") -> list[Any]:
    """``n`` seeded samples of ``task`` at ``length`` tokens from ``split`` (``test`` or ``val``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    check_split_seeds(seed, n)
    mod = _intervention_tasks()
    if mod is not None and task in tuple(mod.TASKS):
        return list(mod.make(tok, task, length, n, seed, split))
    from ..plans.tasks import TASKS as LONG
    from ..plans.tasks import make_samples

    if task not in LONG:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(task_names())}")
    return make_samples(tok, task, length, n, seed + (VAL_OFFSET if split == "val" else 0))


def sample_id(sample: Any) -> str:
    """A short stable name of a sample's prompt (its token ids), the same for every arm that scores it."""
    ids = ",".join(str(int(t)) for t in sample.ids)
    return hashlib.sha1(f"{sample.task}:{ids}".encode()).hexdigest()[:12]


def target_text(tok: Any, sample: Any) -> str:
    """What a correct continuation says, for the teacher-forced validation objective: ``sample.target`` when the
    task gives one, else its answers joined by ", ", after a space unless the prompt ends in a quote or a space
    (the kv task's prompt ends with an open quote)."""
    target = getattr(sample, "target", None)
    if target:
        return str(target)
    one = getattr(sample, "mode", "all") in ("first", "call")  # closed-set / exact tasks: the first answer
    body = str(sample.answers[0]) if one else ", ".join(str(a) for a in sample.answers)
    tail = tok.decode(list(sample.ids[-1:])) if len(sample.ids) else ""
    return body if tail[-1:] in ('"', "'", " ", "\n") else " " + body


#: prompt length of a long-context task when none is given (--quick: the first)
LONG_LENGTHS = (512, 1024)


def lengths_for(task: str, lengths: Sequence[int] | None, quick: bool) -> list[int]:
    """``lengths`` when given, else the task's own length (the intervention tasks' ``DEFAULT_LENGTHS``; the
    long-context tasks: 512 with ``quick``, else 1024)."""
    if lengths:
        return [int(x) for x in lengths]
    mod = _intervention_tasks()
    own = getattr(mod, "DEFAULT_LENGTHS", {}) if mod is not None else {}
    if task in own:
        return [int(own[task])]
    return [LONG_LENGTHS[0] if quick else LONG_LENGTHS[1]]


def target_ids(tok: Any, sample: Any) -> list[int]:
    ids = list(tok(target_text(tok, sample), add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"sample of task {sample.task!r} has an empty target")
    return ids


def pairs(tok: Any, samples: Sequence[Any]) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, target ids)`` of each sample (the validation objective's input)."""
    return [(list(s.ids), target_ids(tok, s)) for s in samples]


__all__ = ["LONG_LENGTHS", "SPLITS", "VAL_OFFSET", "check_split_seeds", "lengths_for", "make", "pairs", "sample_id",
           "target_ids", "target_text", "task_names"]
