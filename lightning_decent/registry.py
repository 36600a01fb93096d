"""Name -> builder registries: one lookup and one option check for topologies, algorithms and compressors.

A :class:`Registry` maps a name (``"ring"``, ``"gut"``, ``"int8"``) to the callable that builds it. Names are
matched without regard to case, with ``-`` read as ``_``, after applying the registry's aliases. The options a
name accepts are the keyword parameters of its builder, so the check of a user's options can never drift from
the code that consumes them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def _normalise(name: str) -> str:
    return name.strip().replace("-", "_").lower()


def _keyword_parameters(builder: Callable[..., Any]) -> tuple[str, ...]:
    """The named parameters of ``builder``; a ``**options`` parameter of a class stands for the options of the
    parent class it is forwarded to (``gasloc`` adds its own to those of every local-steps algorithm)."""
    parameters = inspect.signature(builder).parameters.values()
    names = tuple(p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    if isinstance(builder, type) and any(p.kind is p.VAR_KEYWORD for p in parameters):
        names += tuple(n for n in _keyword_parameters(builder.__mro__[1]) if n not in names)
    return names


class Registry(Mapping[str, Callable[..., T]], Generic[T]):
    """Builders by name for one kind of object (``"topology"``, ``"algorithm"``, ``"compressor"``).

    Args:
        kind: what the registry holds, as error messages name it.
        builders: the initial entries, in the order error messages list them.
        aliases: short names, e.g. ``{"d2": "exact_diffusion"}``.
        leading: how many leading arguments :meth:`build` receives positionally and are no options (a
            topology's ``n``).
        shared_options: options every entry accepts besides its builder's own (an algorithm's modifiers);
            the caller consumes them before :meth:`build`.
        note: a sentence appended to the unknown-name error (e.g. about a name prefix the caller handles).

    As a mapping it holds the canonical names only: ``registry["ring"]`` is the builder, ``"d2" in registry``
    is false.
    """

    def __init__(
        self,
        kind: str,
        builders: Mapping[str, Callable[..., T]] | None = None,
        *,
        aliases: Mapping[str, str] | None = None,
        leading: int = 0,
        shared_options: tuple[str, ...] = (),
        note: str = "",
    ) -> None:
        self.kind = kind
        self._builders: dict[str, Callable[..., T]] = {}
        self._aliases: dict[str, str] = {}
        self._leading = leading
        self._shared_options = shared_options
        self._note = note
        for name, builder in (builders or {}).items():
            self.register(name, builder)
        for alias, target in (aliases or {}).items():
            if target not in self._builders:
                raise ValueError(f"Alias {alias!r} of {kind} names {target!r}, which is not registered.")
            self._aliases[_normalise(alias)] = target

    def register(self, name: str, builder: Callable[..., T]) -> Callable[..., T]:
        """Add ``builder`` under ``name`` (lower case, ``_`` between words); returns ``builder``."""
        if _normalise(name) != name or not name:
            raise ValueError(f"Register the {self.kind} under {_normalise(name)!r}, not {name!r}: lower case, '_'.")
        if name in self._builders or name in self._aliases:
            raise ValueError(f"A {self.kind} named {name!r} is already registered; choose another name.")
        if not callable(builder):
            raise TypeError(f"The builder of {self.kind} {name!r} must be callable, got {builder!r}.")
        self._builders[name] = builder
        return builder

    def names(self) -> tuple[str, ...]:
        """The canonical names, in registration order."""
        return tuple(self._builders)

    @property
    def aliases(self) -> dict[str, str]:
        """Short name -> canonical name."""
        return dict(self._aliases)

    def resolve(self, name: str) -> str:
        """The canonical name of ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
        key = _normalise(name)
        key = self._aliases.get(key, key)
        if key not in self._builders:
            aliases = ", ".join(f"{a}={t}" for a, t in self._aliases.items())
            raise ValueError(
                f"Unknown {self.kind} {name!r}; valid names: {', '.join(self._builders)}"
                + (f" (aliases: {aliases})" if aliases else "")
                + (f" ({self._note})" if self._note else "")
                + "."
            )
        return key

    def options(self, name: str) -> tuple[str, ...]:
        """The keyword options ``name`` accepts: its builder's parameters after the leading ones, then the
        shared options."""
        own = _keyword_parameters(self._builders[self.resolve(name)])[self._leading :]
        return own + tuple(n for n in self._shared_options if n not in own)

    def check_options(self, name: str, options: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming the accepted options if ``options`` holds one that ``name`` does not take."""
        accepted = self.options(name)
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(
                f"{self.kind} {self.resolve(name)!r} does not take option(s) {unknown}; "
                f"its options are: {', '.join(accepted) or 'none'}."
            )

    def build(self, name: str, *args: Any, **options: Any) -> T:
        """Check ``options`` and call the builder of ``name`` with ``args`` and them."""
        self.check_options(name, options)
        return self._builders[self.resolve(name)](*args, **options)

    def __getitem__(self, name: str) -> Callable[..., T]:
        return self._builders[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={list(self._builders)})"
