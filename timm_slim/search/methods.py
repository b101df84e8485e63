"""The two search methods over a grid of per-stage widths, as pure functions of an evaluator.

* :func:`greedy` is AutoSlim's rule (Yu & Huang, 2019): from the full width, shrink one stage by
  one grid step at a time, the stage whose shrink loses the least validation accuracy per unit
  of cost saved, and record every configuration on the way down.
* :func:`evolution` is Once-for-All's (Cai et al., 2020): a population of configurations that
  fit the budget, the best quarter kept as parents, children by mutation and crossover (a
  child that does not fit is drawn again), for a number of generations.

Both take ``score(config) -> (top-1 %, loss)`` and ``cost(config) -> float``, and are
deterministic: the greedy order breaks ties by stage index, evolution draws from
``random.Random(seed)``.
"""

from __future__ import annotations

import random
from typing import Callable, List, Sequence, Tuple

__all__ = ['evolution', 'greedy']

Config = Tuple[float, ...]
Score = Callable[[Config], Tuple[float, float]]
Cost = Callable[[Config], float]


def greedy(score: Score, cost: Cost, grid: Sequence[float], num_stages: int, stop_below: float) -> List[Config]:
    """The configurations AutoSlim's greedy slimming visits, full width first, until one costs
    less than ``stop_below`` or every stage is at the grid's smallest width."""
    grid = sorted(grid)
    index = [len(grid) - 1] * num_stages
    current = tuple(grid[i] for i in index)
    path = [current]
    while cost(current) >= stop_below and any(index):
        top1, loss = score(current)
        here = cost(current)
        options = []
        for stage in range(num_stages):
            if index[stage] == 0:
                continue
            candidate = tuple(grid[i - 1] if s == stage else grid[i] for s, i in enumerate(index))
            saved = here - cost(candidate)
            c_top1, c_loss = score(candidate)
            if saved <= 0:   # a shrink that saves nothing is free: take it first
                options.append(((float('-inf'), 0.0, stage), stage))
                continue
            options.append((((top1 - c_top1) / saved, (c_loss - loss) / saved, stage), stage))
        _, stage = min(options)
        index[stage] -= 1
        current = tuple(grid[i] for i in index)
        path.append(current)
    return path


def _random_fitting(rng: random.Random, grid: Sequence[float], num_stages: int, fresh: Callable[[Config], bool],
                    fits: Callable[[Config], bool], tries: int) -> Config:
    """A random configuration that fits (a new one if ``tries`` draws find one)."""
    fitting = None
    for _ in range(tries):
        config = tuple(rng.choice(grid) for _ in range(num_stages))
        if fresh(config):
            return config
        if fitting is None and fits(config):
            fitting = config
    if fitting is not None:
        return fitting
    # the budget is tight: walk a random configuration down until it fits
    config = list(rng.choice(grid) for _ in range(num_stages))
    ordered = sorted(grid)
    while not fits(tuple(config)):
        stage = rng.randrange(num_stages)
        config[stage] = ordered[max(0, ordered.index(config[stage]) - 1)]
        if all(c == ordered[0] for c in config) and not fits(tuple(config)):
            raise ValueError('no configuration of the grid fits the budget')
    return tuple(config)


def evolution(score: Score, cost: Cost, grid: Sequence[float], num_stages: int, budget: float, seed: int = 0,
              population: int = 16, generations: int = 8, parent_ratio: float = 0.25, mutate_prob: float = 0.2,
              mutation_ratio: float = 0.5, tries: int = 200) -> List[Config]:
    """Every configuration the evolution evaluated (all fit ``budget``), in the order met."""
    if population < 2 or generations < 1:
        raise ValueError(f'evolution needs population >= 2 and generations >= 1, got {population}, {generations}')
    rng = random.Random(seed)
    grid = sorted(grid)

    def fits(config: Config) -> bool:
        return cost(config) <= budget

    def key(config: Config) -> Tuple[float, float]:
        top1, loss = score(config)
        return (-top1, loss)

    seen: List[Config] = []

    def note(config: Config) -> Config:
        if config not in seen:
            seen.append(config)
        return config

    def fresh(config: Config) -> bool:   # a child already evaluated teaches nothing: draw again
        return fits(config) and config not in seen

    members = [note(_random_fitting(rng, grid, num_stages, fresh, fits, tries)) for _ in range(population)]
    parents_count = max(1, int(round(population * parent_ratio)))
    mutations = int(round((population - parents_count) * mutation_ratio))
    for _ in range(generations):
        parents = sorted(members, key=key)[:parents_count]
        children: List[Config] = []
        for _ in range(mutations):
            children.append(note(_child(lambda p=parents: _mutate(rng, rng.choice(p), grid, mutate_prob), fresh, fits,
                                        tries, rng.choice(parents))))
        while len(parents) + len(children) < population:
            children.append(note(_child(lambda p=parents: _cross(rng, rng.choice(p), rng.choice(p)), fresh, fits,
                                        tries, rng.choice(parents))))
        members = parents + children
    return seen


def _child(make: Callable[[], Config], fresh: Callable[[Config], bool], fits: Callable[[Config], bool], tries: int,
           fallback: Config) -> Config:
    """A new configuration that fits; else one that fits; else ``fallback`` (a parent)."""
    fitting = None
    for _ in range(tries):
        child = make()
        if fresh(child):
            return child
        if fitting is None and fits(child):
            fitting = child
    return fitting if fitting is not None else fallback


def _mutate(rng: random.Random, parent: Config, grid: Sequence[float], prob: float) -> Config:
    return tuple(rng.choice(grid) if rng.random() < prob else w for w in parent)


def _cross(rng: random.Random, a: Config, b: Config) -> Config:
    return tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b))
