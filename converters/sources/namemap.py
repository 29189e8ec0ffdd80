"""Name maps: how source tensor names become target names (``--rename-map FILE.json``).

Two JSON forms (the reshard-spec language's name maps will plug in as a third kind of
:class:`NameMap`):

- a plain object ``{"old.name": "new.name", "dropped.name": null}``: exact names; a
  ``null`` value drops the tensor; names not listed are kept;
- ``{"rules": [{"pattern": REGEX, "replace": TEMPLATE}, {"pattern": REGEX, "drop":
  true}]}``: the first rule whose pattern matches the *whole* name applies
  (``re.fullmatch``; ``\\1``/``\\g<name>`` in the template); unmatched names are kept.
  An optional ``"names"`` object of exact renames is tried before the rules.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ckptd.converters.sources.base import PlanError

_DROP = object()


@dataclass(frozen=True)
class Rule:
    """One regex rule: ``replace`` is a ``re`` template; ``None`` drops the tensor."""

    pattern: re.Pattern[str]
    replace: str | None


@dataclass(frozen=True)
class NameMap:
    """Exact renames, then regex rules (see the module docstring). Immutable."""

    names: tuple[tuple[str, str | None], ...] = ()
    rules: tuple[Rule, ...] = field(default=())

    def apply(self, name: str) -> str | None:
        """The target name of ``name``, or ``None`` if it is dropped."""
        exact = dict(self.names)
        if name in exact:
            return exact[name]
        for r in self.rules:
            m = r.pattern.fullmatch(name)
            if m is not None:
                return None if r.replace is None else m.expand(r.replace)
        return name

    def digest(self) -> str:
        """A stable text form (part of a plan's fingerprint)."""
        rules = [[r.pattern.pattern, r.replace] for r in self.rules]
        return json.dumps([sorted(self.names, key=lambda kv: kv[0]), rules])


def load_name_map(path: str) -> NameMap:
    """Parse a ``--rename-map`` file; errors name the file and the bad entry."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as e:
        raise PlanError(f"{path}: cannot read the rename map: {e}") from e
    except ValueError as e:
        raise PlanError(f"{path}: rename map is not valid JSON: {e}") from e
    return parse_name_map(doc, path)


def parse_name_map(doc: object, where: str = "rename map") -> NameMap:
    """Build a :class:`NameMap` from its JSON document."""
    if not isinstance(doc, dict):
        raise PlanError(f"{where}: expected a JSON object")
    if "rules" not in doc:
        return NameMap(names=_exact(doc, where))
    extra = set(doc) - {"rules", "names"}
    if extra:
        raise PlanError(f"{where}: unknown keys {sorted(extra)} (expected 'rules', 'names')")
    rules = []
    if not isinstance(doc["rules"], list):
        raise PlanError(f"{where}: 'rules' must be a list")
    for i, r in enumerate(doc["rules"]):
        if not isinstance(r, dict) or not isinstance(r.get("pattern"), str):
            raise PlanError(f"{where}: rule {i} needs a string 'pattern'")
        try:
            pat = re.compile(r["pattern"])
        except re.error as e:
            raise PlanError(f"{where}: rule {i}: bad pattern {r['pattern']!r}: {e}") from e
        if r.get("drop") is True:
            rules.append(Rule(pat, None))
        elif isinstance(r.get("replace"), str):
            rules.append(Rule(pat, r["replace"]))
        else:
            raise PlanError(f"{where}: rule {i} needs a string 'replace' or \"drop\": true")
    return NameMap(names=_exact(doc.get("names", {}), where), rules=tuple(rules))


def _exact(doc: object, where: str) -> tuple[tuple[str, str | None], ...]:
    if not isinstance(doc, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in doc.items()
    ):
        raise PlanError(f"{where}: exact renames must map names to names or null")
    return tuple(doc.items())
