"""How the Scheduler places a wave of fetches: tasks submitted to the lanes in plan order, and each fetched
expert put in the form it earns (admission, with the victims' demotions materialised). A part of the
Scheduler (stages/scheduler.py), which owns the state it works on."""

from __future__ import annotations

from typing import Any

from ..cache import Form, Key
from ..schedule import Task, outline_layer, pieces_for
from .protocol import Delivery

__all__ = ["Placement"]


class Placement:
    """Mixed into Scheduler: uses its cache, sizes, costs, config, runner, counters and flights."""

    def _dispatch(self, wave) -> list[Delivery]:
        sizes, entries = self.sizes, self.cache.entries
        planes = self.config.recombine_on_device
        runner = self.runner
        workers = runner.workers
        raw = self.raw_codec
        parts = pieces_for(
            0 if raw else len(wave),
            min(workers, self.config.decode_parts or workers),
            min((sizes[k].shards for k, _, _ in wave), default=1),
        )
        times = self._task_times()
        tasks = [Task(key, *times(key, form), tokens, form, parts) for key, form, tokens in wave]
        lanes = sorted(range(workers), key=self._lane_load.__getitem__)  # least loaded first
        plan = outline_layer(tasks, workers)  # lane ranks: lanes[rank] is the lane
        busy = [0] * workers
        by_lane: list = [()] * workers
        for rank, b in enumerate(plan.rank_busy):
            busy[lanes[rank]] = b
            by_lane[lanes[rank]] = plan.lanes[rank]
        c = self.counters
        c["planned_io_s"] += plan.io_busy
        c["planned_cpu_s"] += sum(busy)
        c["planned_makespan_s"] += plan.makespan
        for lane, b in enumerate(busy):
            self._lane_load[lane] += b
        regions: list[Any] = [None] * len(tasks)  # (E region, SM region) handles per task
        for i, t in enumerate(tasks):  # what is already in memory
            if t.tag == Form.COMPRESSED:
                regions[i] = entries[t.key].payload
            elif t.tag == Form.SM:
                regions[i] = (None, entries[t.key].payload)
        for i in plan.io:  # reads, in plan order
            t = tasks[i]
            c["bytes_read_planned"] += sizes[t.key].read(t.tag)
            if raw:
                regions[i] = (None, runner.read(t.key, "all"))
            elif t.tag == Form.SM:
                regions[i] = (runner.read(t.key, "exp"), regions[i][1])
            else:
                regions[i] = runner.read_split(t.key)
        outputs: list[Any] = [None] * len(tasks)  # per task: its decoded handle (raw: its read)
        pieces: list[Any] = [None] * len(tasks)  # per task cut into pieces: their handles
        for lane, planned in enumerate(by_lane):  # decodes, per lane in plan order
            if not planned:
                continue
            jobs = [(tasks[i].key, *regions[i], planes, part) for i, _, _, part in planned]
            for (i, index, count, _), h in zip(planned, runner.decode_lane(lane, jobs)):
                if count == 1:
                    outputs[i] = h
                else:
                    if pieces[i] is None:
                        pieces[i] = [None] * count
                    pieces[i][index] = h
        kind = self._kind()
        deliveries = []
        for i, t in enumerate(tasks):
            cut = pieces[i]
            out = regions[i][1] if raw else outputs[i]
            final = self._admit(t.key, t.tag, regions[i], out)
            d = Delivery(
                t.key[1], cut[0] if cut is not None else out, kind, final == Form.FULL, t.tag.label, cut
            )
            self._flights[t.key].delivery = d
            deliveries.append(d)
        return deliveries

    def _task_times(self):
        """(I/O seconds, decode seconds) of fetching an expert from a form, remembered per (key, form) for
        the costs in use (a new CostModel starts afresh): two cost-model calls per fetch were a tenth of
        dispatching a layer."""
        costs, planes = self.costs, self.config.recombine_on_device
        memo = self.__dict__.get("_times")
        if memo is None or memo[0] is not costs:
            memo = self._times = (costs, {})
        known, sizes = memo[1], self.sizes

        def times(key, form):
            got = known.get((key, form))
            if got is None:
                s = sizes[key]
                got = known[(key, form)] = (costs.io_time(s, form), costs.cpu_time(s, form, planes))
            return got

        return times

    def _kind(self) -> str:
        """What a fetched expert's output is (and a kept full payload therefore holds): see Delivery."""
        return "raw" if self.raw_codec else ("planes" if self.config.recombine_on_device else "words")

    def _least_loaded_lane(self) -> int:
        return min(range(len(self._lane_load)), key=self._lane_load.__getitem__)

    def _admit(self, key: Key, src: Form, parts: tuple[Any, Any], output: Any) -> Form:
        """Place a just-fetched expert in the best form it earns now (see ExpertCache.admit), turn the
        staging that became cached bytes into held bytes, and materialise the victims' new forms. Host
        forms are sets of region objects (COMPRESSED = E + SM, SM = SM), so no bytes are copied here."""
        allowed = (Form.FULL,) if self.raw_codec else (Form.FULL, Form.COMPRESSED, Form.SM)
        target = self.cache.choose(key, allowed)
        if target == src or target == Form.DISK:
            return src
        s = self.sizes[key]
        read_bytes, out_bytes = self._staging(key, src)
        if target == Form.FULL:
            moved = out_bytes
            payload = (
                output if self.config.keep_full_payload and not self.config.recombine_on_device else None
            )
        elif target == Form.COMPRESSED:
            moved = read_bytes  # the regions just read are kept
            payload = parts
        else:  # SM, from a disk read: keep its SM region
            moved = s.sm
            payload = parts[1]
        flight = self._flights.get(key)
        if moved and flight is not None:
            self.cache.release(moved)
            flight.staging -= moved
        final, demotions = self.cache.admit(key, target, payload)
        for d in demotions:
            self._demote(d)
        if final != target and moved and flight is not None:
            self.cache.reserve(moved)  # it stays transient after all
            flight.staging += moved
        return final

    def _demote(self, d) -> None:
        """Give a victim its new, cheaper form: COMPRESSED -> SM drops the E region; FULL re-splits its
        weights on a decode lane (SM) and re-reads only the E region (COMPRESSED); no host copy otherwise."""
        if d.src == Form.FULL:
            self._drops.append(d.key)
        if d.dst == Form.DISK:
            return
        if d.src == Form.COMPRESSED:  # -> SM
            self.cache.set_payload(d.key, d.payload[1])
            return
        self.counters["background_tasks"] += 1
        lane = self._least_loaded_lane()
        words = d.payload  # FULL weights (CPU executors keep a handle), or None
        sm = (
            self.runner.derive(lane, d.key, words, "raw")
            if words is not None
            else self.runner.read(d.key, "raw")
        )
        self.cache.set_payload(d.key, sm if d.dst == Form.SM else (self.runner.read(d.key, "exp"), sm))
