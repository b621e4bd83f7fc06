"""The cache's victim search as it was before the heaps (a scan of every member per search): the
reference that tests and benchmarks/bench_scheduler.py compare the incremental one against."""

from __future__ import annotations

import heapq

from zipmoe_ray.cache import ExpertCache


class ScanningCache(ExpertCache):
    """ExpertCache whose victims come from scoring every member of the form (O(n) per search)."""

    def _victims(self, form, nbytes, score, exclude):
        if self._fits(form, nbytes):
            return []
        pop = self.popularity
        cands = [(pop.score(k), k) for k in self._members[form] if k != exclude and self.entries[k].pins == 0]
        heapq.heapify(cands)
        freed, out = 0, []
        while cands:
            sc, k = heapq.heappop(cands)
            if sc >= score:
                return None
            out.append(k)
            freed += self.entries[k].sizes.held(form)
            if self._fits(form, nbytes, freed):
                return out
        return None
