"""The access policy: who may do what (agency x role x action x scope), from one data file.

`shared/access_policy.yaml` is the policy; this module loads and validates it and answers
`allowed(actor, action, resource) -> Decision`. Pure: no FastAPI, faust, asyncpg or aiokafka
import, no I/O at import (the file is read on the first call to `policy()`, which every
service's composition root makes at start, so a bad file stops the service with its reason).

An *actor* is anything with `sub`, `agency`, `municipality` and `roles` (the JWT claims, intake's
Actor), or None for a caller without a token. A *resource* says where the thing lives: its
municipality (None for a national figure), the offices involved in it (`(agency, municipality)`
pairs: the reporting office and the offices holding a referral, or the office a referral is
addressed to) and its owner (an inbox belongs to one subject).

The scope of the caller relative to a resource is the narrowest that holds:
`self` (they own it) < `own_office` (their office is involved) < `own_municipality` (same
municipality; a token for "*" covers every municipality and the national sums) < `national`.
A grant covers its scope and every narrower one.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

POLICY_FILE = Path(__file__).with_name("access_policy.yaml")
SCOPES = ("self", "own_office", "own_municipality", "national")
_RANK = {s: i for i, s in enumerate(SCOPES)}


class PolicyError(ValueError):
    """The policy file is wrong; the message names the entry and what to fix."""


class ActorLike(Protocol):
    sub: str
    agency: Any
    municipality: str
    roles: tuple[str, ...]


def _value(v: Any) -> str:
    return str(getattr(v, "value", v))


@dataclass(frozen=True)
class Resource:
    municipality: str | None = None  # None: a national figure
    offices: frozenset[tuple[str, str]] = frozenset()  # (agency, municipality) involved
    owner: str | None = None  # a subject (an inbox)
    # Facts some actions look at: `worst_form` (bool), `open_referral_agencies` (agencies with an
    # open referral on the case), `override_reason` (str).
    facts: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    status: int = 200  # 200, 401 (no token), 403 (not allowed), 409 (allowed, but not now)
    scope: str | None = None  # the grant's scope that allowed it
    overridden: bool = False  # a case.close that needed and used the override

    def __bool__(self) -> bool:
        return self.allowed


@dataclass(frozen=True)
class Grant:
    agencies: frozenset[str]
    roles: frozenset[str]
    scope: str
    public: bool = False

    def describe(self) -> str:
        if self.public:
            return "anyone, also without a token"
        roles = sorted(self.roles)
        roles_txt = roles[0] if len(roles) == 1 else f"{', '.join(roles[:-1])} or {roles[-1]}"
        where = {"self": "their own items", "own_office": "their own office's",
                 "own_municipality": "in their municipality", "national": "anywhere"}[self.scope]
        return f"a {roles_txt} of {', '.join(sorted(self.agencies))} ({where})"


@dataclass(frozen=True)
class Action:
    name: str
    what: str
    grants: tuple[Grant, ...]
    blocked_while_open: frozenset[str] = frozenset()
    override: str | None = None


@dataclass(frozen=True)
class Policy:
    agencies: tuple[str, ...]
    roles: Mapping[str, frozenset[str]]  # role -> agencies that may hold it
    actions: Mapping[str, Action]
    case_events: Mapping[str, str]
    routes: Mapping[str, Mapping[str, tuple[str, ...]]]  # service -> "METHOD path" -> actions
    lead_agency: str
    scopes: Mapping[str, str]

    # --- who the caller is ---------------------------------------------------------------------

    def effective_roles(self, actor: ActorLike | None) -> frozenset[str]:
        """The roles of a token its agency may hold; any other role gives nothing."""
        if actor is None:
            return frozenset()
        agency = _value(actor.agency)
        return frozenset(r for r in actor.roles if agency in self.roles.get(r, frozenset()))

    def ignored_roles(self, actor: ActorLike) -> list[str]:
        return sorted(set(actor.roles) - self.effective_roles(actor))

    def holds(self, actor: ActorLike | None, role: str) -> bool:
        return role in self.effective_roles(actor)

    @staticmethod
    def relation(actor: ActorLike, resource: Resource) -> str:
        """The narrowest scope that holds between the caller and the resource."""
        if resource.owner is not None and resource.owner == actor.sub:
            return "self"
        agency, mine = _value(actor.agency), actor.municipality
        if any(a == agency and (m == mine or mine == "*") for a, m in resource.offices):
            return "own_office"
        if mine == "*" or (resource.municipality is not None and resource.municipality == mine):
            return "own_municipality"
        return "national"

    # --- the answer ------------------------------------------------------------------------------

    def action(self, name: str) -> Action:
        try:
            return self.actions[name]
        except KeyError:
            raise PolicyError(f"unknown action {name!r}; the policy knows {', '.join(sorted(self.actions))}") from None

    def allowed(self, actor: ActorLike | None, action: str, resource: Resource = Resource()) -> Decision:
        act = self.action(action)
        granted = self._grant(actor, act, resource)
        if granted is None:
            return self._refusal(actor, act, resource)
        if act.blocked_while_open and resource.facts.get("worst_form"):
            blocking = sorted(act.blocked_while_open & {_value(a) for a in
                                                        resource.facts.get("open_referral_agencies", ())})
            if blocking:
                reason = str(resource.facts.get("override_reason") or "").strip()
                may_override = act.override is not None and self._grant(
                    actor, self.action(act.override), resource) is not None
                if may_override and reason:
                    return Decision(True, f"{action} overriding open {', '.join(blocking)} referrals: {reason}",
                                    scope=granted.scope, overridden=True)
                fix = ("give `override_reason` (a sentence, recorded on the event) to close it anyway"
                       if may_override else
                       "ask those agencies to complete or decline their referrals, or the municipal "
                       "coordinator to close it with a reason")
                return Decision(False, f"the case is a worst form of child labour and its "
                                       f"{' and '.join(blocking)} referral{'s are' if len(blocking) > 1 else ' is'} "
                                       f"still open, so it cannot be closed yet: {fix}", status=409)
        return Decision(True, f"{action}: {granted.describe()}", scope=granted.scope)

    def _grant(self, actor: ActorLike | None, act: Action, resource: Resource) -> Grant | None:
        roles = self.effective_roles(actor)
        rel = None if actor is None else self.relation(actor, resource)
        for g in act.grants:
            if g.public:
                return g
            if actor is None or _value(actor.agency) not in g.agencies or not (roles & g.roles):
                continue
            if _RANK[rel] <= _RANK[g.scope]:
                return g
        return None

    def _refusal(self, actor: ActorLike | None, act: Action, resource: Resource) -> Decision:
        who = "; ".join(g.describe() for g in act.grants) or "nobody"
        if actor is None:
            return Decision(False, f"{act.name} needs a bearer token: send Authorization: Bearer <JWT> "
                                   f"(allowed: {who})", status=401)
        agency = _value(actor.agency)
        ignored = self.ignored_roles(actor)
        note = ""
        if ignored:
            note = " " + "; ".join(
                f"role {r!r} gives nothing to {agency} (only {', '.join(sorted(self.roles[r])) or 'nobody'} may hold it)"
                if r in self.roles else f"role {r!r} is unknown" for r in ignored) + "."
        where = f"{agency}/{actor.municipality}"
        return Decision(False, f"{where} with roles {sorted(self.effective_roles(actor)) or 'none'} may not "
                               f"{act.what}.{note} Allowed: {who}.", status=403)

    def reach(self, actor: ActorLike | None, action: str) -> str | None:
        """The broadest scope the caller is granted for `action` (None: not granted at all)."""
        act = self.action(action)
        roles = self.effective_roles(actor)
        best = None
        for g in act.grants:
            if g.public:
                return "national"
            if actor is None or _value(actor.agency) not in g.agencies or not (roles & g.roles):
                continue
            if best is None or _RANK[g.scope] > _RANK[best]:
                best = g.scope
        return best

    def case_event_actions(self, event_type: str, changed: Iterable[str] = ()) -> list[str]:
        """The actions one POST /v1/cases/{id}/events needs (an update may need several)."""
        kind = event_type.removeprefix("case.")
        out = [self.case_events[kind]]
        for f in changed:
            extra = self.case_events.get(f"{kind}.{f}")
            if extra and extra not in out:
                out.append(extra)
        return out

    def route_actions(self, service: str, method: str, path: str) -> tuple[str, ...] | None:
        key = f"{method.upper()} {path}"
        return self.routes.get(service, {}).get(key) or self.routes.get("every_service", {}).get(key)


# --- loading and validation ------------------------------------------------------------------------


def _names(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{where}: expected a list of names, got {value!r}")
    return value


def _agencies_of(value: Any, where: str, agencies: tuple[str, ...]) -> frozenset[str]:
    names = _names(value, where)
    for a in names:
        if a not in agencies:
            raise PolicyError(f"{where}: unknown agency {a!r}; the policy's agencies are {', '.join(agencies)}")
    return frozenset(names)


def _known_action(name: Any, where: str, actions: Mapping[str, Action]) -> str:
    if name not in actions:
        raise PolicyError(f"{where}: unknown action {name!r}; the policy's actions are {', '.join(actions)}")
    return name


def _agencies(raw: Mapping[str, Any], agencies_known: Iterable[str] | None) -> tuple[str, ...]:
    agencies = tuple(_names(raw.get("agencies"), "agencies"))
    if agencies_known is not None:
        unknown = sorted(set(agencies) - set(agencies_known))
        if unknown:
            raise PolicyError(f"agencies: unknown agency {unknown[0]!r}; known: {', '.join(sorted(agencies_known))}")
    return agencies


def _roles(raw: Mapping[str, Any], agencies: tuple[str, ...]) -> dict[str, frozenset[str]]:
    roles_raw = raw.get("roles") or {}
    if not isinstance(roles_raw, Mapping) or not roles_raw:
        raise PolicyError("roles: expected a mapping of role -> agencies that may hold it")
    return {r: _agencies_of(a, f"roles.{r}", agencies) for r, a in roles_raw.items()}


def _grant(g: Any, gw: str, agencies: tuple[str, ...], roles: Mapping[str, frozenset[str]]) -> Grant:
    if not isinstance(g, Mapping):
        raise PolicyError(f"{gw}: expected a mapping")
    extra = set(g) - {"agencies", "roles", "scope", "public"}
    if extra:
        raise PolicyError(f"{gw}: unknown key {sorted(extra)[0]!r}")
    if g.get("public"):
        return Grant(frozenset(), frozenset(), "national", public=True)
    g_agencies = _agencies_of(g.get("agencies"), f"{gw}.agencies", agencies)
    g_roles = frozenset(_names(g.get("roles"), f"{gw}.roles"))
    for r in sorted(g_roles):
        if r not in roles:
            raise PolicyError(f"{gw}.roles: unknown role {r!r}; the policy's roles are {', '.join(roles)}")
        if not (roles[r] & g_agencies):
            raise PolicyError(f"{gw}: role {r!r} is granted to {', '.join(sorted(g_agencies))}, "
                              f"none of which may hold it (roles.{r})")
    scope = g.get("scope")
    if scope not in SCOPES:
        raise PolicyError(f"{gw}.scope: unknown scope {scope!r}; one of {', '.join(SCOPES)}")
    return Grant(g_agencies, g_roles, scope)


def _actions(raw: Mapping[str, Any], agencies: tuple[str, ...],
             roles: Mapping[str, frozenset[str]]) -> dict[str, Action]:
    actions: dict[str, Action] = {}
    for name, spec in (raw.get("actions") or {}).items():
        where = f"actions.{name}"
        if not isinstance(spec, Mapping) or not spec.get("grants"):
            raise PolicyError(f"{where}: give `what` and at least one grant")
        extra = set(spec) - {"what", "grants", "blocked_while_open", "override"}
        if extra:
            raise PolicyError(f"{where}: unknown key {sorted(extra)[0]!r}")
        grants = [_grant(g, f"{where}.grants[{i}]", agencies, roles) for i, g in enumerate(spec["grants"])]
        blocked = _agencies_of(spec.get("blocked_while_open", []), f"{where}.blocked_while_open", agencies)
        actions[name] = Action(name=name, what=str(spec.get("what") or name), grants=tuple(grants),
                               blocked_while_open=blocked, override=spec.get("override"))
    for a in actions.values():
        if a.override is not None and a.override not in actions:
            raise PolicyError(f"actions.{a.name}.override: unknown action {a.override!r}")
    return actions


def _routes(raw: Mapping[str, Any], actions: Mapping[str, Action]) -> dict[str, dict[str, tuple[str, ...]]]:
    routes: dict[str, dict[str, tuple[str, ...]]] = {}
    for service, table in (raw.get("routes") or {}).items():
        routes[service] = {}
        for route, acts in (table or {}).items():
            method, _, path = str(route).partition(" ")
            if method not in {"GET", "POST", "PUT", "PATCH", "DELETE"} or not path.startswith("/"):
                raise PolicyError(f"routes.{service}: {route!r} is not 'METHOD /path'")
            routes[service][route] = tuple(_known_action(x, f"routes.{service}.{route}", actions)
                                           for x in _names(acts, f"routes.{service}.{route}"))
    return routes


def parse(raw: Mapping[str, Any], *, agencies_known: Iterable[str] | None = None) -> Policy:
    """Validate the policy document; every error names the entry."""
    if not isinstance(raw, Mapping):
        raise PolicyError("the access policy must be a YAML mapping")
    if raw.get("version") != 1:
        raise PolicyError(f"version: expected 1, got {raw.get('version')!r}")
    agencies = _agencies(raw, agencies_known)
    scopes = raw.get("scopes") or {}
    if list(scopes) != list(SCOPES):
        raise PolicyError(f"scopes: expected exactly {', '.join(SCOPES)} in that order, got {list(scopes)}")
    roles = _roles(raw, agencies)
    lead = raw.get("lead_agency")
    if lead not in agencies:
        raise PolicyError(f"lead_agency: unknown agency {lead!r}")
    actions = _actions(raw, agencies, roles)
    case_events = {k: _known_action(v, f"case_events.{k}", actions)
                   for k, v in (raw.get("case_events") or {}).items()}
    return Policy(agencies=agencies, roles=roles, actions=actions, case_events=case_events,
                  routes=_routes(raw, actions), lead_agency=lead, scopes=dict(scopes))


def load(path: Path | str | None = None) -> Policy:
    from shared.events import AgencyType  # pydantic models only, no I/O

    path = path or POLICY_FILE

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {exc}") from None
    try:
        return parse(raw, agencies_known=[a.value for a in AgencyType])
    except PolicyError as exc:
        raise PolicyError(f"{Path(path).name}: {exc}") from None


@functools.cache
def policy() -> Policy:
    """The bundled policy, loaded once (services call this at start)."""
    return load()


def allowed(actor: ActorLike | None, action: str, resource: Resource = Resource()) -> Decision:
    return policy().allowed(actor, action, resource)


# --- the README table -------------------------------------------------------------------------------


def render_matrix(p: Policy | None = None) -> str:
    """The access matrix as a Markdown table: one row per action, one column per agency, each
    cell the roles and their scope ("public" for anyone)."""
    p = p or policy()
    short = {"self": "self", "own_office": "office", "own_municipality": "municipality", "national": "national"}
    head = "| action | " + " | ".join(p.agencies) + " |"
    lines = [head, "|---|" + "---|" * len(p.agencies)]
    for name, act in p.actions.items():
        cells = []
        for agency in p.agencies:
            if any(g.public for g in act.grants):
                cells.append("anyone")
                continue
            by_scope: dict[str, set[str]] = {}
            for g in act.grants:
                if agency in g.agencies:
                    by_scope.setdefault(g.scope, set()).update(r for r in g.roles if agency in p.roles[r])
            parts = [f"{', '.join(sorted(roles))} ({short[scope]})" for scope, roles in
                     sorted(by_scope.items(), key=lambda kv: _RANK[kv[0]]) if roles]
            cells.append("; ".join(parts) or "-")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Roles and the agencies that may hold them: " + "; ".join(
        f"`{r}`: {', '.join(a for a in p.agencies if a in ags)}" for r, ags in p.roles.items()) + ".")
    blocked = [a for a in p.actions.values() if a.blocked_while_open]
    for a in blocked:
        lines.append(f"`{a.name}` is refused (409) on a worst-form case while a referral to "
                     f"{' or '.join(sorted(a.blocked_while_open))} is open, unless the caller may "
                     f"`{a.override}` and gives a reason.")
    return "\n".join(lines) + "\n"


README_BEGIN = "<!-- access matrix: python -m shared.access -->\n"
README_END = "<!-- end access matrix -->"


def write_readme(path: Path) -> bool:
    """Put the rendered matrix between the README's markers; True when it changed."""
    text = path.read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        raise PolicyError(f"{path}: add the markers {README_BEGIN.strip()} and {README_END} where the matrix goes")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    new = head + README_BEGIN + render_matrix() + README_END + tail
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":  # python -m shared.access [--readme README.md]: the matrix for the README
    if len(sys.argv) == 3 and sys.argv[1] == "--readme":
        print("updated" if write_readme(Path(sys.argv[2])) else "already current")
    else:
        sys.stdout.write(render_matrix())
