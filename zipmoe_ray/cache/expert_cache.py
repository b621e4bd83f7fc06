"""The compression-aware expert cache: which form each expert is held in, under one byte budget.

The budget covers every form and the staging buffers (read buffers and decoded outputs in flight):

    sum(bytes held in each form) + staging <= budget            (hard, checked on every change)
    bytes held in form F <= capacity[F]                         (the split between forms)

Admission: an expert just fetched is placed in the best form (FULL > COMPRESSED > SM) whose capacity has
room, or where colder unpinned experts can make room; those victims fall back to the next cheaper form
that can take them (a full expert becomes compressed or SM-only, not straight disk), and only then to
disk. Popularity (decayed token counts, or recency for LRU) decides who is colder. Experts in flight are
pinned and never chosen as victims. This class only decides and accounts; the Scheduler moves the bytes.
Thread-safe.

Cost: every operation is O(log n) in the experts held, or O((victims + pinned) log n) for admissions; the
coldest members of each form come from a lazily maintained heap (cache/coldest.py), never from a scan.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from ..errors import BudgetError
from .coldest import ColdestFirst
from .forms import ExpertSizes, Form, Key
from .popularity import Popularity

__all__ = ["CacheEntry", "Demotion", "ExpertCache"]

CACHED_FORMS = (Form.FULL, Form.COMPRESSED, Form.SM)
_DISK = Form.DISK


@dataclass
class CacheEntry:
    key: Key
    sizes: ExpertSizes
    form: Form = Form.DISK
    payload: Any = None  # the bytes of a host form (a handle: ObjectRef, Future or array); None otherwise
    pins: int = 0


@dataclass(frozen=True)
class Demotion:
    key: Key
    src: Form
    dst: Form
    payload: Any = None  # what the expert held in ``src`` (to derive the new form from)


@dataclass
class _Counters:
    hits: dict[Form, int] = field(default_factory=lambda: {f: 0 for f in Form})
    admissions: dict[Form, int] = field(default_factory=lambda: {f: 0 for f in Form})
    demotions: int = 0


class ExpertCache:
    def __init__(
        self,
        sizes: dict[Key, ExpertSizes],
        budget: int,
        capacity: dict[Form, int],
        popularity: Popularity | None = None,
    ):
        if sum(capacity.get(f, 0) for f in CACHED_FORMS) > budget:
            raise BudgetError("form capacities exceed the memory budget")
        self.budget = int(budget)
        self.capacity = {f: int(capacity.get(f, 0)) for f in CACHED_FORMS}
        self.popularity = popularity or Popularity()
        self.entries: dict[Key, CacheEntry] = {k: CacheEntry(k, s) for k, s in sizes.items()}
        self.used = {f: 0 for f in CACHED_FORMS}
        self._held = 0  # sum(self.used.values()), kept up to date by _set_form (read on every reservation)
        self.staging = 0
        self.peak = 0
        self.counters = _Counters()
        self._members = {f: ColdestFirst(self.popularity.score) for f in CACHED_FORMS}
        self._epoch = self.popularity.epoch
        self._lock = threading.RLock()

    # -- accounting ------------------------------------------------------------------------------------
    @property
    def held(self) -> int:
        return self._held

    @property
    def total(self) -> int:
        return self._held + self.staging

    def _note_peak(self) -> None:
        t = self._held + self.staging
        if t > self.budget:  # the hard limit: every change is checked against it
            raise BudgetError(
                f"cache accounting exceeds the memory budget: {t:,} B held and staged > {self.budget:,} B "
                f"(held {self.held:,} B, staging {self.staging:,} B); this is a bug in zipmoe-ray, please report it"
            )
        if t > self.peak:
            self.peak = t

    def form(self, key: Key) -> Form:
        return self.entries[key].form

    def members(self, form: Form) -> set[Key]:
        return (
            set(self._members[form])
            if form != Form.DISK
            else {k for k, e in self.entries.items() if e.form == form}
        )

    # -- staging ---------------------------------------------------------------------------------------
    def can_reserve(self, nbytes: int) -> bool:
        with self._lock:
            return self._held + self.staging + nbytes <= self.budget

    def reserve(self, nbytes: int) -> None:
        """Account ``nbytes`` of staging buffers; raises BudgetError if the budget cannot hold them."""
        with self._lock:
            if self._held + self.staging + nbytes > self.budget:
                raise BudgetError(
                    f"staging {nbytes} bytes would exceed the budget ({self.total} of {self.budget} in use)"
                )
            self.staging += nbytes
            self._note_peak()

    def release(self, nbytes: int) -> None:
        with self._lock:
            if nbytes > self.staging:
                raise BudgetError(
                    f"releasing {nbytes:,} B of staging with only {self.staging:,} B staged (released twice?); "
                    "this is a bug in zipmoe-ray, please report it"
                )
            self.staging -= nbytes

    # -- pins ------------------------------------------------------------------------------------------
    def pin(self, key: Key) -> None:
        with self._lock:
            self.entries[key].pins += 1

    def unpin(self, key: Key) -> None:
        with self._lock:
            e = self.entries[key]
            e.pins -= 1
            assert e.pins >= 0, f"{key} unpinned more often than pinned"

    # -- popularity ------------------------------------------------------------------------------------
    def touch(self, key: Key, tokens: int = 1) -> Form:
        """Record a use of ``key`` by ``tokens`` tokens; returns its current form (counted as a hit in it)."""
        with self._lock:
            self.popularity.touch(key, tokens)
            f = self.entries[key].form
            if f != _DISK:
                self._members[f].rescored(key)
            self.counters.hits[f] += 1
            return f

    def seed(self, key: Key, value: float) -> None:
        """Give ``key`` a prior popularity (one step's expected use, from a plan)."""
        with self._lock:
            self.popularity.seed(key, value)
            f = self.entries[key].form
            if f != Form.DISK:
                self._members[f].rescored(key)

    def step(self) -> None:
        """Age popularity by one generation step."""
        with self._lock:
            self.popularity.step()
            if self.popularity.epoch != self._epoch:  # every score was rescaled: re-order every form
                self._epoch = self.popularity.epoch
                for order in self._members.values():
                    order.rebuild()

    # -- moving between forms ----------------------------------------------------------------------------
    def _set_form(self, key: Key, form: Form, payload: Any = None) -> None:
        e = self.entries[key]
        if e.form != Form.DISK:
            n = e.sizes.held(e.form)
            self.used[e.form] -= n
            self._held -= n
            self._members[e.form].discard(key)
        e.form = form
        e.payload = payload if form != Form.DISK else None
        if form != Form.DISK:
            n = e.sizes.held(form)
            self.used[form] += n
            self._held += n
            self._members[form].add(key)
        self._note_peak()

    def set_payload(self, key: Key, payload: Any) -> None:
        with self._lock:
            self.entries[key].payload = payload

    def _fits(self, form: Form, nbytes: int, freed: int = 0) -> bool:
        return (
            self.used[form] - freed + nbytes <= self.capacity[form]
            and self._held + self.staging - freed + nbytes <= self.budget
        )

    def _victims(self, form: Form, nbytes: int, score: float, exclude: Key) -> list[Key] | None:
        """Coldest unpinned members of ``form`` (all colder than ``score``) whose eviction makes room for
        ``nbytes``; None if that is impossible. Changes nothing."""
        if self._fits(form, nbytes):
            return []
        entries = self.entries
        order = self._members[form]
        freed, out = 0, []
        try:
            for _, k in order.coldest(score, lambda k: k == exclude or entries[k].pins > 0):
                out.append(k)
                freed += entries[k].sizes.held(form)
                if self._fits(form, nbytes, freed):
                    return out
            return None
        finally:
            order.restore()

    def _place_down(self, key: Key, below: Form, demotions: list[Demotion], depth: int) -> None:
        """Demote ``key`` (currently in form ``below``'s better neighbour) to the best form under ``below``."""
        e = self.entries[key]
        src, old = e.form, e.payload
        score = self.popularity.score(key)
        for f in CACHED_FORMS:
            if f <= below:
                continue
            need = e.sizes.held(f)
            victims = (
                self._victims(f, need, score, key) if depth < 3 else ([] if self._fits(f, need) else None)
            )
            if victims is None:
                continue
            self._set_form(key, Form.DISK)  # free its old bytes first
            for v in victims:
                self._place_down(v, f, demotions, depth + 1)
            self._set_form(key, f)
            demotions.append(Demotion(key, src, f, old))
            self.counters.demotions += 1
            return
        self._set_form(key, Form.DISK)
        demotions.append(Demotion(key, src, Form.DISK, old))
        self.counters.demotions += 1

    def choose(self, key: Key, allowed: tuple[Form, ...] = CACHED_FORMS) -> Form:
        """The best form ``key`` could be admitted to now (no change made)."""
        with self._lock:
            e = self.entries[key]
            score = self.popularity.score(key)
            for f in allowed:
                if f >= e.form:
                    break
                if self.capacity[f] and self._victims(f, e.sizes.held(f), score, key) is not None:
                    return f
            return e.form

    def admit(self, key: Key, form: Form, payload: Any = None) -> tuple[Form, list[Demotion]]:
        """Move ``key`` to ``form``, demoting colder unpinned experts to make room (each to the next cheaper
        form that can take it). Returns the form ``key`` ended in (``form``, or DISK in the rare case the
        victims' own fall-back took the room back) and the demotions made, which the Scheduler materialises.
        The key's previous payload is dropped: forms are exclusive."""
        with self._lock:
            e = self.entries[key]
            need = e.sizes.held(form)
            victims = self._victims(form, need, self.popularity.score(key), key)
            if victims is None:
                raise BudgetError(f"no room to admit {key} in form {form.label}; ask choose() first")
            demotions: list[Demotion] = []
            self._set_form(key, Form.DISK)
            for v in victims:
                self._place_down(v, form, demotions, 0)
            if not self._fits(form, need):
                return Form.DISK, demotions
            self._set_form(key, form, payload)
            self.counters.admissions[form] += 1
            return form, demotions

    def resize(self, capacity: dict[Form, int]) -> list[Demotion]:
        """Give the forms new capacities (an online re-plan of the split). Every form over its new capacity
        sheds its coldest unpinned members, each to the next cheaper form with room (else disk), as
        admissions do; pinned experts stay until released, and the form takes nothing new until it is back
        under its capacity. Returns the demotions made, which the Scheduler materialises."""
        with self._lock:
            new = {f: int(capacity.get(f, 0)) for f in CACHED_FORMS}
            if sum(new.values()) > self.budget:
                raise BudgetError("form capacities exceed the memory budget")
            self.capacity = new
            demotions: list[Demotion] = []
            entries = self.entries
            for form in CACHED_FORMS:
                if self.used[form] <= new[form]:
                    continue
                order = self._members[form]
                shed, over = [], self.used[form] - new[form]
                try:
                    for _, k in order.coldest(float("inf"), lambda k: entries[k].pins > 0):
                        shed.append(k)
                        over -= entries[k].sizes.held(form)
                        if over <= 0:
                            break
                finally:
                    order.restore()
                for k in shed:
                    self._place_down(
                        k, form, demotions, 3
                    )  # no further victims: cheaper forms take what fits
            return demotions

    def shed(self) -> list[Demotion]:
        """Bring every form back under its capacity where pinned experts kept it over (a resize while they
        were in flight): their coldest unpinned members fall back, as in ``resize``. Without this, the
        bytes over the capacities would eat the staging reserve. O(1) when no form is over."""
        with self._lock:
            if all(self.used[f] <= self.capacity[f] for f in CACHED_FORMS):
                return []
            return self.resize(self.capacity)

    def drop(self, key: Key) -> None:
        """Send ``key`` to disk (e.g. its payload was lost with a failed node)."""
        with self._lock:
            self._set_form(key, Form.DISK)

    def report(self) -> dict[str, Any]:
        with self._lock:
            return {
                "budget": self.budget,
                "capacity": {f.label: c for f, c in self.capacity.items()},
                "held": {f.label: u for f, u in self.used.items()},
                "experts": {f.label: len(self._members[f]) for f in CACHED_FORMS},
                "staging": self.staging,
                "peak": self.peak,
                "admissions": {f.label: n for f, n in self.counters.admissions.items() if f != Form.DISK},
                "demotions": self.counters.demotions,
            }
