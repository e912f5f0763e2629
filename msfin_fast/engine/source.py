"""The deferred value ``t + CA_producer(u) + e1 + e2``: one type from the plan down to the kernels.

An RRCAB pass ends in ``t + CA(u)``, and ``CA`` needs the mean of ``u`` over the whole image, so
the pass leaves its result unfinished and the next launch that reads it finishes it while loading
(kernels/source.py gives the arithmetic). ``Source`` names the parts of such a value. The plan
holds it over symbolic values (``t``, ``u``, ``e1``, ``e2`` are ``plan.Buf``, ``sums`` a
``plan.SumsSlot``, ``producer`` the producing block's name); the executor hands every backend the
same type over tensors (NHWC, ``sums`` fp32 [N, C]) with ``producer`` that block's packed weights
in the reading backend's own format, whose ``ca`` attribute is its channel attention. This module
imports nothing, so the plan, every backend and the kernels can share it.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Source(NamedTuple):
    t: Any
    u: Any = None
    sums: Any = None
    producer: Any = None
    e1: Any = None
    e2: Any = None

    @property
    def deferred(self) -> bool:
        """Whether a channel attention is still to be applied (``u`` is set)."""
        return self.u is not None

    @property
    def addends(self) -> list:
        return [e for e in (self.e1, self.e2) if e is not None]

    @property
    def is_plain(self) -> bool:
        """Nothing to finish: the value is ``t`` itself."""
        return self.u is None and self.e1 is None and self.e2 is None

    @property
    def parts(self) -> list:
        """The activations the value is made of (``t``, ``u``, ``e1``, ``e2`` that are set)."""
        return [b for b in (self.t, self.u, self.e1, self.e2) if b is not None]

    @property
    def ca(self):
        """The producer's channel attention in the reading backend's layout (None if not deferred)."""
        return self.producer.ca if self.u is not None and self.producer is not None else None

    def bind(self, lookup, producer) -> "Source":
        """This symbolic value over concrete ones: ``lookup`` maps each part and the sums,
        ``producer`` is the packed producer (used only when deferred)."""
        get = lambda v: None if v is None else lookup(v)  # noqa: E731
        return Source(get(self.t), get(self.u), get(self.sums), producer if self.u is not None else None,
                      get(self.e1), get(self.e2))
