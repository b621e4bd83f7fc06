"""How the Scheduler places a wave of fetches: tasks submitted to the lanes in plan order, and each fetched
expert put in the form it earns (admission, with the victims' demotions materialised). A part of the
Scheduler (stages/scheduler.py), which owns the state it works on."""

from __future__ import annotations

from typing import Any

from ..cache import Form, Key
from ..schedule import Task, pieces_for, plan_layer
from .protocol import Delivery

__all__ = ["Placement"]


class Placement:
    """Mixed into Scheduler: uses its cache, sizes, costs, config, runner, counters and flights."""

    def _dispatch(self, wave) -> list[Delivery]:
        costs, sizes, entries = self.costs, self.sizes, self.cache.entries
        planes = self.config.recombine_on_device
        workers = self.runner.workers
        decodes = 0 if self.raw_codec else len(wave)
        parts = pieces_for(
            decodes,
            min(workers, self.config.decode_parts or workers),
            min((sizes[k].shards for k, _, _ in wave), default=1),
        )
        tasks = []
        for key, form, tokens in wave:
            s = sizes[key]
            tasks.append(
                Task(key, costs.io_time(s, form), costs.cpu_time(s, form, planes), tokens, form, parts)
            )
        lanes = sorted(range(workers), key=self._lane_load.__getitem__)  # least loaded first
        plan = plan_layer(tasks, workers, lanes)
        busy = plan.cpu_busy
        c = self.counters
        c["planned_io_s"] += plan.io_busy
        c["planned_cpu_s"] += sum(busy)
        c["planned_makespan_s"] += plan.makespan
        for lane, b in enumerate(busy):
            self._lane_load[lane] += b
        regions: dict[Key, tuple[Any, Any]] = {}  # (E region, SM region) handles per expert
        for t in tasks:  # what is already in memory
            if t.tag == Form.COMPRESSED:
                regions[t.key] = entries[t.key].payload
            elif t.tag == Form.SM:
                regions[t.key] = (None, entries[t.key].payload)
        runner = self.runner
        for t in plan.io_order:  # reads, in plan order
            c["bytes_read_planned"] += sizes[t.key].read(t.tag)
            if self.raw_codec:
                regions[t.key] = (None, runner.read(t.key, "all"))
            elif t.tag == Form.SM:
                regions[t.key] = (runner.read(t.key, "exp"), regions[t.key][1])
            else:
                regions[t.key] = runner.read_split(t.key)
        outputs: dict[Key, list[Any]] = {}
        for lane, pieces in enumerate(plan.lanes):  # decodes, per lane in plan order
            if not pieces:
                continue
            jobs = [
                (p.key, *regions[p.key], planes, (p.index, p.count) if p.count > 1 else None) for p in pieces
            ]
            for p, h in zip(pieces, runner.decode_lane(lane, jobs)):
                outputs.setdefault(p.key, [None] * p.count)[p.index] = h
        kind = self._kind()
        deliveries = []
        for t in tasks:
            handles = [regions[t.key][1]] if self.raw_codec else outputs[t.key]
            one = len(handles) == 1
            final = self._admit(t.key, t.tag, regions[t.key], handles[0] if one else None)
            d = Delivery(
                t.key[1], handles[0], kind, final == Form.FULL, t.tag.label, None if one else handles
            )
            self._flights[t.key].delivery = d
            deliveries.append(d)
        return deliveries

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
