"""The referral rules, pure: no web, broker or database imports.

- Routing: a versioned YAML file loaded and validated with pydantic, and `route(case)`.
  `load_rules()` reads one file; everything else works on values. A file that does not validate
  raises `RulesError` whose message names the rule id (or its position) and the field, so a
  worker refuses to start with a sentence a person can act on.
- Who may see and act on a referral (`scoped_filters`, `decide`; the policy is
  `shared/access_policy.yaml`), and the ids and names the use cases derive.
- The state machine lives in the second pure module `states.py` (imported here, so the use cases
  read every rule from this module).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.events import (
    AgeBand,
    AgencyType,
    CaseIdentified,
    ReportSource,
    SchoolStatus,
    Sector,
    describe_validation_error,
)
from services.referral.states import (  # noqa: F401 - the state machine, read through this module
    Action,
    IllegalTransition,
    legal_actions,
    next_status,
    within_deadline,
)
from shared import access
from shared.errors import Forbidden
from shared.events import ReferralStatus
from shared.reference import municipality_slugs, office_serving

if TYPE_CHECKING:  # shared.auth is the HTTP side; a rule needs only the claims' fields
    from shared.auth import Claims

DEFAULT_RULES_FILE = Path(__file__).with_name("rules.yaml")

Priority = Literal["urgent", "high", "normal"]
PRIORITY_RANK: dict[str, int] = {"urgent": 0, "high": 1, "normal": 2}  # lower is more pressing

_DURATION = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_UNIT = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class RulesError(ValueError):
    """The rule file is unusable; `errors` lists one sentence per problem."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        super().__init__(f"invalid routing rules in {source}: " + "; ".join(errors))


def parse_duration(value: Any) -> timedelta:
    """`90s`, `30m`, `2h`, `5d` -> timedelta (positive)."""
    if not isinstance(value, str):
        raise ValueError(f"deadline must be a string like '24h', '2h' or '5d', got {value!r}")
    m = _DURATION.match(value)
    if not m:
        raise ValueError(f"deadline {value!r} must be a number and a unit s/m/h/d, e.g. '24h', '2h', '5d'")
    n = int(m.group(1))
    if n <= 0:
        raise ValueError(f"deadline {value!r} must be positive")
    return timedelta(**{_UNIT[m.group(2)]: n})


class Condition(BaseModel):
    """Case fields to match (a value: equals; a list: one of; a single value is read as a
    one-item list), combined with AND, plus
    `any` (OR of conditions), `all` (AND of conditions) and `not`. Empty matches everything."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    age_band: list[AgeBand] | None = None
    compulsory_school_age: bool | None = None
    sector: list[Sector] | None = None
    hazardous: bool | None = None
    worst_form: bool | None = None
    employer_involved: bool | None = None
    reporter_agency: list[AgencyType] | None = None
    report_source: list[ReportSource] | None = None
    school_status: list[SchoolStatus] | None = None
    municipality: list[str] | None = None
    any_: list[Condition] | None = Field(None, alias="any")
    all_: list[Condition] | None = Field(None, alias="all")
    not_: Condition | None = Field(None, alias="not")

    @field_validator("age_band", "sector", "reporter_agency", "report_source", "school_status",
                     "municipality", mode="before")
    @classmethod
    def _as_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("any_", "all_")
    @classmethod
    def _non_empty(cls, v: list[Condition] | None) -> list[Condition] | None:
        if v is not None and not v:
            raise ValueError("must list at least one condition")
        return v

    @field_validator("municipality")
    @classmethod
    def _known_municipality(cls, v: list[str] | None) -> list[str] | None:
        for slug in v or []:
            if slug not in municipality_slugs():
                raise ValueError(f"unknown municipality {slug!r}")
        return v

    def matches(self, case: CaseIdentified) -> bool:
        for name in CASE_FIELDS:
            want = getattr(self, name)
            if want is None:
                continue
            have = getattr(case, name)
            if isinstance(want, list):
                if have not in want:
                    return False
            elif have != want:
                return False
        if self.any_ is not None and not any(c.matches(case) for c in self.any_):
            return False
        if self.all_ is not None and not all(c.matches(case) for c in self.all_):
            return False
        if self.not_ is not None and self.not_.matches(case):
            return False
        return True


CASE_FIELDS: tuple[str, ...] = (
    "age_band", "compulsory_school_age", "sector", "hazardous", "worst_form", "employer_involved",
    "reporter_agency", "report_source", "school_status", "municipality",
)


class Override(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    when: Condition
    deadline: timedelta
    priority: Priority | None = None

    @field_validator("deadline", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> timedelta:
        return parse_duration(v)


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_.\-]*$", max_length=80)
    description: str = ""
    when: Condition
    target: AgencyType
    deadline: timedelta
    priority: Priority
    overrides: tuple[Override, ...] = ()
    legal_basis: str = Field(min_length=1, max_length=500)

    @field_validator("deadline", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> timedelta:
        return parse_duration(v)

    @field_validator("target")
    @classmethod
    def _not_coordinator(cls, v: AgencyType) -> AgencyType:
        if v is AgencyType.coordinator:
            raise ValueError("the coordinator receives escalations, not referrals; pick an agency")
        return v

    def terms(self, case: CaseIdentified) -> tuple[timedelta, str]:
        """Deadline and priority for this case (the first matching override wins)."""
        for o in self.overrides:
            if o.when.matches(case):
                return o.deadline, o.priority or self.priority
        return self.deadline, self.priority


@dataclass(frozen=True, slots=True)
class Decision:
    """One referral to open: which agency office, by when, why."""

    agency: AgencyType
    office_id: str
    deadline_in: timedelta
    deadline: datetime
    priority: Priority
    rule_id: str
    rule_version: int
    legal_basis: str
    matched_rules: tuple[str, ...]


OfficeLookup = Callable[[str, str], Any]  # (agency, municipality) -> object with .office_id


ROUTE_CACHE_MAX = 4096  # distinct case shapes remembered per rule set (there are far fewer in practice)


@dataclass(frozen=True)
class RuleSet:
    version: int
    rules: tuple[Rule, ...]
    source: str = "<memory>"
    # Routing reads only the case's CASE_FIELDS (the conditions, the overrides, the office of the
    # municipality), so two cases alike in those are routed alike but for the deadline's start:
    # the decisions are remembered per shape, and only `at + deadline_in` is done per case.
    _by_shape: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def route(self, case: CaseIdentified, *, at: datetime,
              office_for: OfficeLookup = office_serving) -> list[Decision]:
        """Every agency that must act on `case`, one decision per agency, most pressing first.

        `at` is when the case was identified (deadlines count from it). When two rules hit one
        agency, the earliest deadline wins, then the higher priority, then the earlier rule;
        the priority is the highest of all matching rules.
        """
        shape = (office_for, *(getattr(case, name) for name in CASE_FIELDS))
        plan = self._by_shape.get(shape)
        if plan is None:
            plan = self._plan(case, office_for)
            if len(self._by_shape) >= ROUTE_CACHE_MAX:
                self._by_shape.clear()
            self._by_shape[shape] = plan
        return [replace(d, deadline=at + d.deadline_in) for d in plan]

    def _plan(self, case: CaseIdentified, office_for: OfficeLookup) -> tuple[Decision, ...]:
        """The decisions for `case` with deadlines counted from the epoch (`route` moves them)."""
        hits: dict[AgencyType, list[tuple[timedelta, str, int, Rule]]] = {}
        for index, rule in enumerate(self.rules):
            if rule.when.matches(case):
                deadline, priority = rule.terms(case)
                hits.setdefault(rule.target, []).append((deadline, priority, index, rule))
        out = []
        for agency, found in hits.items():
            deadline, _, _, winner = min(found, key=lambda h: (h[0], PRIORITY_RANK[h[1]], h[2]))
            priority = min((h[1] for h in found), key=PRIORITY_RANK.__getitem__)
            office = office_for(agency.value, case.municipality)
            out.append(Decision(
                agency=agency, office_id=office.office_id, deadline_in=deadline, deadline=_EPOCH + deadline,
                priority=priority, rule_id=winner.id, rule_version=self.version,
                legal_basis=winner.legal_basis, matched_rules=tuple(h[3].id for h in found),
            ))
        out.sort(key=lambda d: (d.deadline_in, PRIORITY_RANK[d.priority], d.agency.value))
        return tuple(out)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)
    rules: list[Any] = Field(min_length=1)


def parse_rules(text: str, *, source: str = "<string>") -> RuleSet:
    """Validate a rule file's text; raise `RulesError` naming every bad rule and field."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RulesError(source, [f"not valid YAML: {exc}"]) from None
    if not isinstance(raw, dict):
        raise RulesError(source, ["the file must be a mapping with 'version' and 'rules'"])
    try:
        head = _File.model_validate(raw)
    except ValidationError as exc:
        raise RulesError(source, [describe_validation_error(exc)]) from None
    errors: list[str] = []
    rules: list[Rule] = []
    seen: set[str] = set()
    for i, item in enumerate(head.rules):
        rid = item.get("id") if isinstance(item, dict) else None
        name = f"rule {rid!r}" if isinstance(rid, str) else f"rule #{i + 1} (no id)"
        if not isinstance(item, dict):
            errors.append(f"{name}: must be a mapping")
            continue
        try:
            rule = Rule.model_validate(item)
        except ValidationError as exc:
            for err in exc.errors():
                field = ".".join(str(p) for p in err["loc"]).replace("any_", "any").replace(
                    "all_", "all").replace("not_", "not")
                msg = err["msg"].removeprefix("Value error, ")
                errors.append(f"{name} field {field}: {msg}")
            continue
        if rule.id in seen:
            errors.append(f"{name} field id: duplicate rule id")
        seen.add(rule.id)
        rules.append(rule)
    if errors:
        raise RulesError(source, _dedupe(errors))
    return RuleSet(version=head.version, rules=tuple(rules), source=source)


def _dedupe(errors: list[str]) -> list[str]:
    # a union type (value | list) reports one error per alternative; keep them, but once each
    out: list[str] = []
    for e in errors:
        if e not in out:
            out.append(e)
    return out


def load_rules(path: Path | str | None = None) -> RuleSet:
    """Read and validate a rule file (the packaged `rules.yaml` by default)."""
    p = Path(path) if path else DEFAULT_RULES_FILE
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError(str(p), [f"cannot read the rule file: {exc.strerror or exc}"]) from None
    return parse_rules(text, source=str(p))


def route(case: CaseIdentified, *, rules: RuleSet, at: datetime,
          office_for: OfficeLookup = office_serving) -> list[Decision]:
    return rules.route(case, at=at, office_for=office_for)


# --- ids and names the use cases derive ----------------------------------------------------------

_ID_NAMESPACE = uuid.UUID("6f2b0f8e-8d1e-4c55-9a51-2f7f0c0e4a11")


def referral_id_for(event_id: uuid.UUID, agency: str) -> uuid.UUID:
    """Deterministic: the same case event and agency always name the same referral."""
    return uuid.uuid5(_ID_NAMESPACE, f"{event_id}:{agency}")


def coordinator_of(municipality: str) -> str:
    return f"coordinator.{municipality}"


def source_of(claims: Claims) -> str:
    """The envelope source of what a person did: `<agency>/<municipality>` (`all` for `*`)."""
    muni = "all" if claims.municipality == "*" else claims.municipality
    return f"{claims.agency.value}/{muni}"


# --- who may see and act ----------------------------------------------------------------------------


def _in_municipality(claims: Claims, municipality: str) -> bool:
    return claims.municipality in (municipality, "*")


def _referral(agency: str, municipality: str) -> access.Resource:
    """A referral as the access policy sees it: addressed to one office of one municipality."""
    return access.Resource(municipality=municipality, offices=frozenset({(agency, municipality)}))


def decide(claims: Claims, action: str, *, agency: str, municipality: str) -> access.Decision:
    """`referral.read` or `referral.act` on a referral to `agency` in `municipality`
    (shared/access_policy.yaml: the receiving office's caseworkers, duty officers and supervisors,
    and the municipality's coordinator)."""
    return access.allowed(claims, action, _referral(agency, municipality))


def may_handle(claims: Claims, *, agency: str, municipality: str) -> bool:
    return bool(decide(claims, "referral.act", agency=agency, municipality=municipality))


@dataclass(frozen=True)
class Filters:
    case_id: uuid.UUID | None = None
    agency: AgencyType | None = None
    municipality: str | None = None
    status: ReferralStatus | None = None
    overdue: bool | None = None
    limit: int = 100
    offset: int = 0


def scoped_filters(claims: Claims, f: Filters) -> Filters:
    """Narrow a query to what the caller may see; `Forbidden` when it asks for more.

    - coordinator: every agency in their municipality (all municipalities with `*`);
    - caseworker / duty officer / supervisor: their own agency in their municipality;
    - anyone else (reporters, analysts, the public): 403.
    Asking explicitly for another municipality or agency is a 403, never a silently empty list.
    """
    muni = f.municipality
    reach = access.policy().reach(claims, "referral.read")
    if reach in ("own_municipality", "national"):
        if muni and reach == "own_municipality" and not _in_municipality(claims, muni):
            raise Forbidden(f"a coordinator of {claims.municipality} cannot see referrals in {muni}")
        if claims.municipality != "*" and reach == "own_municipality":
            muni = claims.municipality
        return replace(f, municipality=muni)
    if reach is None:
        raise Forbidden(access.allowed(claims, "referral.read", _referral("-", "-")).reason)
    if f.agency and f.agency is not claims.agency:
        raise Forbidden(f"{claims.agency.value} staff cannot see referrals addressed to {f.agency.value}")
    if muni and not _in_municipality(claims, muni):
        raise Forbidden(f"staff of {claims.municipality} cannot see referrals in {muni}")
    if claims.municipality != "*":
        muni = claims.municipality
    return replace(f, agency=claims.agency, municipality=muni)
