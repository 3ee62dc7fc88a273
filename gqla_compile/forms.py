"""The compute forms of one call over a path's cache (DESIGN.md section 2b): their FLOP terms, the per-call rule
that picks one, and the crossover between them. A path's ``compute_forms`` builds a :class:`FormChoice`; the
runtime's core applies its rule per call, and the plan and the report describe it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ComputeForm:
    """How one call computes its attention over a path's cache, with its FLOP terms for one layer and sequence.

    The path fixes what is cached; a form is how one call (T new tokens over S keys, the new ones among them)
    reads it. ``flops(T, S) = T S per_pair + T per_query + S per_key``: the scores and weighted sums, what each
    new token costs besides (moving its query into latent space, W_UV and o_proj after attention), and what
    each key costs before (expanding its latent into per-group keys and values). Integers, so that the
    runtime's choice on symbolic shapes under torch.compile is one guard, not a graph per length.
    """

    name: str
    description: str
    per_pair: int
    per_query: int
    per_key: int
    elements_per_key: int  # what the call reads per key (and writes, for an expansion), in elements
    expands_cache: bool = False  # the call expands the latent cache into per-group keys and values first

    def flops(self, new, keys):
        """FLOPs of a call with ``new`` new tokens over ``keys`` keys (ints or torch SymInts)."""
        return new * keys * self.per_pair + new * self.per_query + keys * self.per_key


#: Prefix lengths the plan and the report state the crossover at (with the plan's context length).
CROSSOVER_PREFIXES: tuple[int, ...] = (0, 256, 1024, 4096)
#: A prefill chunk after a cached prefix, as the plan and the report show it.
CHUNK = 512
#: The longest call the crossover search considers (new tokens): past it a form that has not won never does.
CROSSOVER_SEARCH_LIMIT = 1 << 24


@dataclass(frozen=True)
class FormChoice:
    """A path's compute forms and the rule that picks one per call: the fewest FLOPs (the compute side of the
    roofline, which a call with many new tokens is bound by; a call with few is the first form's).

    The first form is what a decode step takes; :meth:`crossover` says from how many new tokens another runs.
    """

    forms: tuple[ComputeForm, ...]

    def choose(self, new, keys) -> ComputeForm:
        """The form of a call with ``new`` new tokens over ``keys`` keys (the prefix and the new tokens)."""
        best = self.forms[0]
        for form in self.forms[1:]:
            if form.flops(new, keys) < best.flops(new, keys):
                best = form
        return best

    def crossover(self, prefix: int) -> int | None:
        """The fewest new tokens after ``prefix`` cached ones from which a form other than the first runs (None:
        never, or with one form). The FLOP difference is a quadratic in the new tokens that is negative at 0
        and, where another form ever wins, grows past its one positive root: a binary search finds it."""
        if len(self.forms) == 1:
            return None

        def other(new: int) -> bool:
            return self.choose(new, prefix + new) is not self.forms[0]

        high = 1
        while not other(high):
            if high >= CROSSOVER_SEARCH_LIMIT:
                return None
            high *= 2
        low = high // 2  # other(low) is False, or low == 0
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if other(middle) else (middle, high)
        return high

    def describe(self, *, s_q: int = 1, context_len: int = 4096) -> dict[str, Any]:
        """Plain data for the plan and the report: the forms, the form each kind of call takes (a decode step
        of ``s_q`` tokens after ``context_len``, a prefill of ``context_len``, a chunk of CHUNK after it) and,
        per prefix length, from how many new tokens the second form runs."""
        calls = [("decode step", s_q, context_len), ("prefill", context_len, 0), ("chunk after a prefix", CHUNK,
                                                                                context_len)]
        prefixes = sorted({*CROSSOVER_PREFIXES, context_len})
        return {
            "forms": [{"name": f.name, "description": f.description, "per_pair": f.per_pair,
                       "per_query": f.per_query, "per_key": f.per_key} for f in self.forms],
            "calls": [{"call": call, "new_tokens": new, "prefix": prefix, "form": self.choose(new, prefix + new).name}
                      for call, new, prefix in calls],
            "crossover": [{"prefix": p, "from_new_tokens": self.crossover(p)} for p in prefixes]
            if len(self.forms) > 1 else [],
        }


def form_text(data: dict[str, Any]) -> str:
    """The line ``FormChoice.describe``'s data reads as (the report renders it from JSON with this too)."""
    forms = [f["name"] for f in data["forms"]]
    calls = "; ".join(f"{c['call']} ({c['new_tokens']} new after {c['prefix']}): {c['form']}" for c in data["calls"])
    if len(forms) == 1:
        return f"one compute form ({forms[0]}) for every call: {calls}"
    points = ", ".join(f"P={c['prefix']}: " + ("never" if c["from_new_tokens"] is None else str(c["from_new_tokens"]))
                       for c in data["crossover"])
    return (f"{calls}; {forms[1]} from T new tokens after a prefix of P cached tokens (fewer FLOPs than "
            f"{forms[0]}): {points}")
