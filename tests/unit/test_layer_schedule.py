"""The layer scheduler against brute-force optimal schedules on small random instances."""

from __future__ import annotations

import itertools
import random

import pytest

from zipmoe_ray.schedule import Task, makespan_of, plan_layer


def brute_force(tasks: list[Task], workers: int) -> float:
    """Optimal makespan: every I/O order x every assignment of tasks to lanes x every order within lanes."""
    reads = [t for t in tasks if t.io > 0]
    decodes = [t for t in tasks if t.cpu > 0]
    best = float("inf")
    for io_order in itertools.permutations(reads):
        for order in itertools.permutations(decodes):
            for assign in itertools.product(range(workers), repeat=len(order)):
                if workers > 1 and assign and assign[0] != 0:
                    continue  # lanes are identical: fix the first task's lane
                lanes = [[t for t, a in zip(order, assign) if a == w] for w in range(workers)]
                best = min(best, makespan_of(list(io_order), lanes))
    return best


def random_tasks(rng: random.Random, n: int) -> list[Task]:
    tasks = []
    for i in range(n):
        kind = rng.choice(["disk", "sm", "compressed"])
        cpu = rng.uniform(1, 10)
        io = {"disk": rng.uniform(2, 20), "sm": rng.uniform(0.5, 4), "compressed": 0.0}[kind]
        tasks.append(Task((0, i), io, cpu, tokens=rng.randint(1, 4), tag=kind))
    return tasks


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_within_the_proven_bound_of_the_optimum(workers):
    rng = random.Random(workers)
    ratios = []
    for _ in range(40 if workers < 3 else 25):
        tasks = random_tasks(rng, rng.randint(1, 5))
        plan = plan_layer(tasks, workers)
        got = makespan_of(plan.io_order, plan.lanes)
        assert got == pytest.approx(plan.makespan)  # the plan's own estimate is the schedule's makespan
        opt = brute_force(tasks, workers)
        assert got <= (3 - 1 / workers) * opt + 1e-9
        ratios.append(got / opt)
    # in practice it is close to optimal, far inside the worst-case bound
    assert sum(ratios) / len(ratios) < 1.15


def test_every_task_is_scheduled_once_and_reads_never_idle():
    rng = random.Random(7)
    tasks = random_tasks(rng, 12)
    plan = plan_layer(tasks, 2)
    scheduled = [t.key for lane in plan.lanes for t in lane]
    assert sorted(scheduled) == sorted(t.key for t in tasks if t.cpu > 0)
    assert sorted(t.key for t in plan.io_order) == sorted(t.key for t in tasks if t.io > 0)
    ends = [plan.io_end[t.key] for t in plan.io_order]
    assert ends == pytest.approx(list(itertools.accumulate(t.io for t in plan.io_order)))
    for lane in plan.lanes:  # a lane never starts a task before its read is done
        for t in lane:
            assert plan.start[t.key] >= plan.io_end.get(t.key, 0.0) - 1e-12


def test_cpu_only_tasks_fill_lanes_while_reads_run():
    disk = [Task((0, i), io=10, cpu=2, tokens=1) for i in range(2)]
    compressed = [Task((0, 10 + i), io=0, cpu=4, tokens=1) for i in range(2)]
    plan = plan_layer(disk + compressed, 2)
    for t in compressed:
        assert plan.start[t.key] == 0.0
    assert plan.makespan == pytest.approx(22)  # bound by the reads: 20 + the last decode


def test_short_reads_go_first():
    sm = Task((0, 1), io=1, cpu=5)
    disk = Task((0, 2), io=8, cpu=5)
    plan = plan_layer([disk, sm], 1)
    assert plan.io_order == [sm, disk]


def brute_force_pieces(tasks: list[Task], workers: int) -> float:
    """Optimal makespan when each task's decode may be cut into its ``parts`` pieces (the plan's count)."""
    from zipmoe_ray.schedule import Piece

    reads = [t for t in tasks if t.io > 0]
    units = [
        Piece(t, i, max(1, min(t.parts, workers)))
        for t in tasks
        if t.cpu > 0
        for i in range(max(1, min(t.parts, workers)))
    ]
    best = float("inf")
    for io_order in itertools.permutations(reads):
        for order in itertools.permutations(units):
            for assign in itertools.product(range(workers), repeat=len(order)):
                if assign and assign[0] != 0:
                    continue
                lanes = [[u for u, a in zip(order, assign) if a == w] for w in range(workers)]
                best = min(best, makespan_of(list(io_order), lanes))
    return best


@pytest.mark.parametrize("workers", [2, 3])
def test_pieces_stay_within_the_bound_of_the_optimum_with_pieces(workers):
    """The guarantee with decodes cut into shard pieces: makespan <= (3 - 1/W) OPT, OPT itself allowed to
    use the pieces (so also within the bound of the optimum without them, which is never lower)."""
    rng = random.Random(10 + workers)
    ratios = []
    for _ in range(20):
        tasks = []
        for i in range(rng.randint(1, 3)):
            t = random_tasks(rng, 1)[0]
            tasks.append(Task((0, i), t.io, t.cpu, t.tokens, t.tag, parts=rng.randint(1, 2)))
        if sum(max(1, min(t.parts, workers)) for t in tasks if t.cpu > 0) > 4:
            continue
        plan = plan_layer(tasks, workers)
        got = makespan_of(plan.io_order, plan.lanes)
        assert got == pytest.approx(plan.makespan)
        for t in tasks:  # every piece of every decode scheduled once
            n = max(1, min(t.parts, workers)) if t.cpu > 0 else 0
            assert sorted(p.index for lane in plan.lanes for p in lane if p.key == t.key) == list(range(n))
        opt = brute_force_pieces(tasks, workers)
        assert got <= (3 - 1 / workers) * opt + 1e-9
        assert opt <= brute_force(tasks, workers) + 1e-9
        ratios.append(got / opt)
    assert ratios and sum(ratios) / len(ratios) < 1.15


def test_fewer_experts_than_lanes_still_use_every_lane():
    tasks = [Task((0, i), io=0.0, cpu=8.0, tokens=1, parts=8) for i in range(3)]
    plan = plan_layer(tasks, 8)
    busy = plan.cpu_busy
    assert min(busy) == pytest.approx(max(busy))  # 24 pieces of 1.0 over 8 lanes: 3 each
    assert plan.makespan == pytest.approx(3.0)
