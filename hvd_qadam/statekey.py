"""The names of the engine's state buffers (and of its per-step work buffers).

Every buffer of a rank's algorithm state is one flat vector named by a :class:`StateKey`; its
string form (:attr:`StateKey.name`) keys the :class:`~hvd_qadam.memory.StateBank`, the step
counters and the optimizer's ``state_dict()``, so it is part of the checkpoint format:

    g<group>.<kind>              worker state of a fused group        g0.e   g0.m   g3.anchor
    g<group>@<start>.<kind>      server state of the range served      g0@512.m   g0@0.e
                                 from element <start> on
    g<group>#<start>.<kind>      worker state of the chunk from        g0#256.e
                                 <start> of the host's mean (the
                                 two-level ``hierarchical`` exchange)
    <scope>.<kind>               an algorithm's own state              onebit.vnorm
    g<group>, g<group>@<start>   without a kind: what a counter        g0   g0@512
                                 (e.g. an Adam step) belongs to

Code builds and inspects keys only through this class (``StateKey.parse(name)`` is the
reverse of ``name``), so what a key means (a residual, server state, a host chunk's residual)
is decided in one place.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

# kinds of state
RESIDUAL = "e"          # error-feedback residual (worker, host chunk, or server)
MOMENT1 = "m"           # Adam's first moment
MOMENT2 = "v"           # Adam's second moment
LATENT = "x"            # the server's full-precision latent weights (qadam_weights)
MOMENTUM = "buf"        # SGD's momentum buffer (ef_sgd)
ANCHOR = "anchor"       # local SGD's last averaged weights

_WORD = r"[A-Za-z_][A-Za-z0-9_]*"
_GROUP = re.compile(rf"g(\d+)(?:@(\d+)|#(\d+))?(?:\.({_WORD}))?")
_SCOPED = re.compile(rf"({_WORD})\.({_WORD})")
_KIND = re.compile(_WORD)


@dataclass(frozen=True)
class StateKey:
    """One buffer's name: a fused group's (``group``; ``shard``: the start of the server range it
    covers, ``host_chunk``: the start of its host chunk) or an algorithm's own (``scope``), and its
    ``kind`` (None: the owner itself, the key of a counter). Build with :meth:`worker`,
    :meth:`server`, :meth:`host` or :meth:`scoped`."""
    group: int | None = None
    kind: str | None = None
    shard: int | None = None
    host_chunk: int | None = None
    scope: str | None = None

    def __post_init__(self):
        if (self.group is None) == (self.scope is None):
            raise ValueError(f"a state key belongs to a group or to a scope, not {self!r}")
        if self.scope is not None:
            if not _KIND.fullmatch(self.scope) or _GROUP.fullmatch(self.scope) or self.kind is None \
                    or self.shard is not None or self.host_chunk is not None:
                raise ValueError(f"a scoped state key is <scope>.<kind> with a scope that is not a group: {self!r}")
        elif self.shard is not None and self.host_chunk is not None:
            raise ValueError(f"a state key covers a server range or a host chunk, not both: {self!r}")
        for what in (self.group, self.shard, self.host_chunk):
            if what is not None and (isinstance(what, bool) or not isinstance(what, int) or what < 0):
                raise ValueError(f"group and element offsets of a state key are non-negative integers: {self!r}")
        if self.kind is not None and not _KIND.fullmatch(self.kind):
            raise ValueError(f"a state key's kind is a word: {self!r}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def worker(cls, group: int, kind: str | None = None) -> StateKey:
        """Worker state of fused group ``group`` (this rank's own)."""
        return cls(group, kind)

    @classmethod
    def server(cls, group: int, start: int, kind: str | None = None) -> StateKey:
        """Server state of the range of group ``group`` that starts at element ``start``."""
        return cls(group, kind, shard=start)

    @classmethod
    def host(cls, group: int, start: int, kind: str | None = None) -> StateKey:
        """Worker state of the chunk of the host's mean of group ``group`` from element ``start``."""
        return cls(group, kind, host_chunk=start)

    @classmethod
    def scoped(cls, scope: str, kind: str) -> StateKey:
        """An algorithm's own state, not tied to a group (e.g. ``onebit.vnorm``)."""
        return cls(kind=kind, scope=scope)

    def of(self, kind: str) -> StateKey:
        """The same owner's buffer of another kind (``g0@512`` -> ``g0@512.m``)."""
        return dataclasses.replace(self, kind=kind)

    @property
    def owner(self) -> StateKey:
        """The key without its kind: what a counter of this buffer's owner is keyed by."""
        return dataclasses.replace(self, kind=None) if self.scope is None else self

    # ------------------------------------------------------------------ string form
    @property
    def name(self) -> str:
        """The string form: the key in the state bank, the counters and ``state_dict()``."""
        if self.scope is not None:
            return f"{self.scope}.{self.kind}"
        head = f"g{self.group}"
        if self.shard is not None:
            head += f"@{self.shard}"
        elif self.host_chunk is not None:
            head += f"#{self.host_chunk}"
        return head if self.kind is None else f"{head}.{self.kind}"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: str) -> StateKey:
        """The key whose :attr:`name` is ``name``; ValueError for a string that is not one."""
        if isinstance(name, str):
            m = _GROUP.fullmatch(name)
            if m:
                g, shard, chunk, kind = m.groups()
                key = cls(int(g), kind, None if shard is None else int(shard), None if chunk is None else int(chunk))
                if key.name == name:          # no leading zeros: one name per key
                    return key
            else:
                m = _SCOPED.fullmatch(name)
                if m:
                    return cls.scoped(*m.groups())
        raise ValueError(f"{name!r} is not an hvd_qadam state key (g<group>[@<start>|#<start>][.<kind>] or "
                         f"<scope>.<kind>); the checkpoint was not written by this version of hvd_qadam or is damaged")

    # ------------------------------------------------------------------ what it is
    @property
    def is_residual(self) -> bool:
        """An error-feedback residual (worker, host chunk or server)."""
        return self.kind == RESIDUAL

    @property
    def is_server_state(self) -> bool:
        """State of a served range (``g<i>@<start>``): sharded over the ranks that serve."""
        return self.shard is not None

    @property
    def is_worker_residual(self) -> bool:
        """A residual of this rank's uplink (of a group, or of a chunk of its host's mean)."""
        return self.is_residual and not self.is_server_state

    @property
    def is_host_residual(self) -> bool:
        """A worker residual of a chunk of the host's mean (the two-level exchange)."""
        return self.is_residual and self.host_chunk is not None

    @property
    def is_anchor(self) -> bool:
        """Local SGD's anchor: the last averaged weights (identical on every rank)."""
        return self.kind == ANCHOR
