"""Workflows and custom fields as data: parsing, validation and the transition rules (pure, no I/O).

A project's workflow lists its states (each with a category), the transitions allowed between them with
their guards, and the state new items start in. It is stored as JSONB in `projects.workflow`:
`{"states": [{"id", "display_name", "category"}], "transitions": [{"from", "to", "guards"}], "initial": id}`
with categories and guards by name (`ACTIVE`, `ASSIGNEE_REQUIRED`). Custom field definitions are stored as
`[{"key", "display_name", "type", "allowed_values"}]` in `projects.custom_fields`.

Validation collects every problem of a definition, each naming its field path in the request
(`project.workflow.states[2].id`), and raises one INVALID_ARGUMENT.
"""

from __future__ import annotations

import enum
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from services.kit.errors import FieldViolation, InvalidArgument
from tessera.workflow.v1 import workflow_pb2

MAX_STATES = 50
MAX_TRANSITIONS = 500
MAX_CUSTOM_FIELDS = 50
MAX_ALLOWED_VALUES = 100
DISPLAY_NAME_MAX_CHARS = 60
ALLOWED_VALUE_MAX_CHARS = 100
STRING_VALUE_MAX_CHARS = 1000

# State ids and custom field keys: lowercase letters, digits and `_`, starting with a letter, 1 to 40.
IDENTIFIER = re.compile(r"[a-z][a-z0-9_]{0,39}")


class StateCategory(enum.StrEnum):
    """What a state means for an item's progress (UNSPECIFIED only in unvalidated input)."""

    UNSPECIFIED = "UNSPECIFIED"
    BACKLOG = "BACKLOG"
    ACTIVE = "ACTIVE"
    DONE = "DONE"
    CANCELLED = "CANCELLED"

    @property
    def closed(self) -> bool:
        """DONE or CANCELLED: the item needs no more work."""
        return self in (StateCategory.DONE, StateCategory.CANCELLED)


class Guard(enum.StrEnum):
    """A condition a transition checks (UNSPECIFIED only in unvalidated input)."""

    UNSPECIFIED = "UNSPECIFIED"
    ASSIGNEE_REQUIRED = "ASSIGNEE_REQUIRED"
    SUBITEMS_CLOSED = "SUBITEMS_CLOSED"


class CustomFieldType(enum.StrEnum):
    """The type of a custom field's values (UNSPECIFIED only in unvalidated input)."""

    UNSPECIFIED = "UNSPECIFIED"
    STRING = "STRING"
    NUMBER = "NUMBER"
    BOOLEAN = "BOOLEAN"
    TIMESTAMP = "TIMESTAMP"
    ENUM = "ENUM"


@dataclass(frozen=True, slots=True)
class State:
    """One state of a workflow."""

    id: str
    display_name: str
    category: StateCategory


@dataclass(frozen=True, slots=True)
class Transition:
    """An allowed move between two states and the guards that must hold for it."""

    from_state: str
    to_state: str
    guards: tuple[Guard, ...] = ()


@dataclass(frozen=True, slots=True)
class Workflow:
    """A state machine; the methods below assume it passed `validate_workflow`."""

    states: tuple[State, ...]
    transitions: tuple[Transition, ...]
    initial_state: str

    def state(self, state_id: str) -> State | None:
        """The state with this id, or None."""
        for state in self.states:
            if state.id == state_id:
                return state
        return None

    def category_of(self, state_id: str) -> StateCategory:
        """The category of a state of this workflow (KeyError for an unknown state)."""
        state = self.state(state_id)
        if state is None:
            raise KeyError(state_id)
        return state.category

    @property
    def state_ids(self) -> tuple[str, ...]:
        return tuple(state.id for state in self.states)

    def allowed_next(self, status: str) -> list[str]:
        """The states an item in `status` may move to, in the order the workflow lists its states."""
        targets = {t.to_state for t in self.transitions if t.from_state == status}
        return [state.id for state in self.states if state.id in targets]

    def check_transition(self, from_state: str, to_state: str) -> Transition | None:
        """The transition from one state to another, or None if the workflow does not allow it."""
        for transition in self.transitions:
            if transition.from_state == from_state and transition.to_state == to_state:
                return transition
        return None

    def to_json(self) -> dict[str, Any]:
        """The stored (JSONB) form."""
        return {
            "states": [{"id": s.id, "display_name": s.display_name, "category": s.category.value} for s in self.states],
            "transitions": [
                {"from": t.from_state, "to": t.to_state, "guards": [g.value for g in t.guards]}
                for t in self.transitions
            ],
            "initial": self.initial_state,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Workflow:
        """A workflow from its stored form."""
        return cls(
            states=tuple(
                State(s["id"], s["display_name"], StateCategory(s["category"])) for s in data.get("states", ())
            ),
            transitions=tuple(
                Transition(t["from"], t["to"], tuple(Guard(g) for g in t.get("guards", ())))
                for t in data.get("transitions", ())
            ),
            initial_state=str(data.get("initial", "")),
        )


def _default_workflow() -> Workflow:
    # "To do" is BACKLOG (planned but not started), so that every ACTIVE state of the default workflow
    # requires an assignee to be entered; only In progress is ACTIVE.
    assignee, subitems = (Guard.ASSIGNEE_REQUIRED,), (Guard.SUBITEMS_CLOSED,)
    return Workflow(
        states=(
            State("backlog", "Backlog", StateCategory.BACKLOG),
            State("todo", "To do", StateCategory.BACKLOG),
            State("in_progress", "In progress", StateCategory.ACTIVE),
            State("done", "Done", StateCategory.DONE),
            State("cancelled", "Cancelled", StateCategory.CANCELLED),
        ),
        transitions=(
            Transition("backlog", "todo"),
            Transition("backlog", "in_progress", assignee),
            Transition("backlog", "cancelled"),
            Transition("todo", "backlog"),
            Transition("todo", "in_progress", assignee),
            Transition("todo", "cancelled"),
            Transition("in_progress", "todo"),
            Transition("in_progress", "done", subitems),
            Transition("in_progress", "cancelled"),
            Transition("done", "in_progress", assignee),
            Transition("cancelled", "backlog"),
        ),
        initial_state="backlog",
    )


DEFAULT_WORKFLOW = _default_workflow()


@dataclass(frozen=True, slots=True)
class CustomFieldDefinition:
    """A typed custom field items of a project may carry."""

    key: str
    display_name: str
    type: CustomFieldType
    allowed_values: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The stored (JSONB) form."""
        return {
            "key": self.key,
            "display_name": self.display_name,
            "type": self.type.value,
            "allowed_values": list(self.allowed_values),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CustomFieldDefinition:
        """A definition from its stored form."""
        return cls(
            key=data["key"],
            display_name=data["display_name"],
            type=CustomFieldType(data["type"]),
            allowed_values=tuple(data.get("allowed_values", ())),
        )


def custom_fields_to_json(definitions: Iterable[CustomFieldDefinition]) -> list[dict[str, Any]]:
    """The stored (JSONB) form of a list of definitions."""
    return [definition.to_json() for definition in definitions]


def custom_fields_from_json(data: Iterable[Mapping[str, Any]]) -> tuple[CustomFieldDefinition, ...]:
    """Definitions from their stored form."""
    return tuple(CustomFieldDefinition.from_json(item) for item in data)


def custom_field_types(definitions: Iterable[CustomFieldDefinition]) -> dict[str, str]:
    """`{key: type name}`, what the query compiler needs to know about a project's custom fields."""
    return {definition.key: definition.type.value for definition in definitions}


# --- validation --------------------------------------------------------------------------------------------


@dataclass
class _Problems:
    violations: list[FieldViolation] = field(default_factory=list)

    def add(self, path: str, description: str) -> None:
        self.violations.append(FieldViolation(path, description))

    def raise_if_any(self, what: str) -> None:
        if self.violations:
            summary = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
            raise InvalidArgument(f"invalid {what}: {summary}", violations=self.violations)


def _check_display_name(problems: _Problems, path: str, value: str) -> None:
    if not value.strip():
        problems.add(path, "must not be empty or only whitespace")
    elif len(value) > DISPLAY_NAME_MAX_CHARS:
        problems.add(path, f"must be at most {DISPLAY_NAME_MAX_CHARS} characters")
    elif any(unicodedata.category(char) == "Cc" for char in value):
        problems.add(path, "must not contain control characters")


def validate_workflow(workflow: Workflow, *, field: str) -> None:
    """INVALID_ARGUMENT naming every problem (`{field}.states[2].id`) unless the workflow is sound."""
    problems = _Problems()
    if not workflow.states:
        problems.add(f"{field}.states", "must have at least one state")
    elif len(workflow.states) > MAX_STATES:
        problems.add(f"{field}.states", f"must have at most {MAX_STATES} states")
    seen: dict[str, int] = {}
    for index, state in enumerate(workflow.states):
        path = f"{field}.states[{index}]"
        if not IDENTIFIER.fullmatch(state.id):
            problems.add(f"{path}.id", "must be 1 to 40 lowercase letters, digits or _, starting with a letter")
        elif state.id in seen:
            problems.add(f"{path}.id", f"duplicate state id {state.id!r} (also states[{seen[state.id]}])")
        else:
            seen[state.id] = index
        _check_display_name(problems, f"{path}.display_name", state.display_name)
        if state.category is StateCategory.UNSPECIFIED:
            problems.add(f"{path}.category", "must be BACKLOG, ACTIVE, DONE or CANCELLED")
    if len(workflow.transitions) > MAX_TRANSITIONS:
        problems.add(f"{field}.transitions", f"must have at most {MAX_TRANSITIONS} transitions")
    pairs: dict[tuple[str, str], int] = {}
    for index, transition in enumerate(workflow.transitions):
        path = f"{field}.transitions[{index}]"
        for attribute in ("from_state", "to_state"):
            state_id = getattr(transition, attribute)
            if state_id not in seen:
                problems.add(f"{path}.{attribute}", f"names unknown state {state_id!r}")
        pair = (transition.from_state, transition.to_state)
        if transition.from_state == transition.to_state:
            problems.add(path, f"moves from {transition.from_state!r} to itself")
        elif pair in pairs:
            problems.add(path, f"duplicate transition {pair[0]!r} → {pair[1]!r} (also transitions[{pairs[pair]}])")
        else:
            pairs[pair] = index
        for guard_index, guard in enumerate(transition.guards):
            if guard is Guard.UNSPECIFIED:
                problems.add(f"{path}.guards[{guard_index}]", "must be ASSIGNEE_REQUIRED or SUBITEMS_CLOSED")
            elif guard in transition.guards[:guard_index]:
                problems.add(f"{path}.guards[{guard_index}]", f"duplicate guard {guard.value}")
    if not workflow.initial_state:
        problems.add(f"{field}.initial_state", "is required")
    elif workflow.initial_state not in seen:
        problems.add(f"{field}.initial_state", f"names unknown state {workflow.initial_state!r}")
    problems.raise_if_any("workflow")


def validate_custom_field_definitions(definitions: Sequence[CustomFieldDefinition], *, field: str) -> None:
    """INVALID_ARGUMENT naming every problem (`{field}[1].allowed_values`) unless the definitions are sound."""
    problems = _Problems()
    if len(definitions) > MAX_CUSTOM_FIELDS:
        problems.add(field, f"must have at most {MAX_CUSTOM_FIELDS} custom fields")
    seen: dict[str, int] = {}
    for index, definition in enumerate(definitions):
        path = f"{field}[{index}]"
        if not IDENTIFIER.fullmatch(definition.key):
            problems.add(f"{path}.key", "must be 1 to 40 lowercase letters, digits or _, starting with a letter")
        elif definition.key in seen:
            problems.add(f"{path}.key", f"duplicate key {definition.key!r} (also {field}[{seen[definition.key]}])")
        else:
            seen[definition.key] = index
        _check_display_name(problems, f"{path}.display_name", definition.display_name)
        values_path = f"{path}.allowed_values"
        if definition.type is CustomFieldType.UNSPECIFIED:
            problems.add(f"{path}.type", "must be STRING, NUMBER, BOOLEAN, TIMESTAMP or ENUM")
        elif definition.type is CustomFieldType.ENUM:
            if not definition.allowed_values:
                problems.add(values_path, "an ENUM field needs at least one allowed value")
            elif len(definition.allowed_values) > MAX_ALLOWED_VALUES:
                problems.add(values_path, f"must have at most {MAX_ALLOWED_VALUES} values")
            for value_index, value in enumerate(definition.allowed_values):
                if not value.strip() or len(value) > ALLOWED_VALUE_MAX_CHARS:
                    problems.add(
                        f"{values_path}[{value_index}]", f"must be 1 to {ALLOWED_VALUE_MAX_CHARS} characters, not blank"
                    )
                elif value in definition.allowed_values[:value_index]:
                    problems.add(f"{values_path}[{value_index}]", f"duplicate value {value!r}")
        elif definition.allowed_values:
            problems.add(values_path, f"only ENUM fields have allowed values, not {definition.type.value}")
    problems.raise_if_any("custom fields")


def validate_custom_field_value(definition: CustomFieldDefinition, value: Any, *, path: str) -> Any:
    """The value in its stored form (numbers as int when integral, timestamps as UTC RFC 3339), or INVALID_ARGUMENT."""
    kind = definition.type
    if kind is CustomFieldType.STRING:
        if not isinstance(value, str):
            raise InvalidArgument.for_field(path, "must be a string")
        if len(value) > STRING_VALUE_MAX_CHARS:
            raise InvalidArgument.for_field(path, f"must be at most {STRING_VALUE_MAX_CHARS} characters")
        return value
    if kind is CustomFieldType.NUMBER:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidArgument.for_field(path, "must be a finite number")
        return int(value) if isinstance(value, float) and value.is_integer() and abs(value) < 2**53 else value
    if kind is CustomFieldType.BOOLEAN:
        if not isinstance(value, bool):
            raise InvalidArgument.for_field(path, "must be true or false")
        return value
    if kind is CustomFieldType.TIMESTAMP:
        if not isinstance(value, str):
            raise InvalidArgument.for_field(path, "must be an RFC 3339 timestamp string")
        return normalize_timestamp(value, path=path)
    if kind is CustomFieldType.ENUM:
        if not isinstance(value, str) or value not in definition.allowed_values:
            allowed = ", ".join(definition.allowed_values)
            raise InvalidArgument.for_field(path, f"must be one of {allowed}")
        return value
    raise InvalidArgument.for_field(path, f"has no usable type ({kind.value})")


def normalize_timestamp(value: str, *, path: str) -> str:
    """An RFC 3339 timestamp with an offset, as UTC `YYYY-MM-DDTHH:MM:SS[.ffffff]Z`; INVALID_ARGUMENT otherwise."""
    try:
        parsed = datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        raise InvalidArgument.for_field(path, "must be an RFC 3339 timestamp like 2026-01-31T09:00:00Z") from None
    if parsed.tzinfo is None or "T" not in value.upper():
        raise InvalidArgument.for_field(path, "must be an RFC 3339 timestamp with a time zone offset")
    return parsed.astimezone(UTC).isoformat().replace("+00:00", "Z")


# --- the contract's messages -------------------------------------------------------------------------------

_CATEGORY_FROM_PROTO = {
    workflow_pb2.STATE_CATEGORY_BACKLOG: StateCategory.BACKLOG,
    workflow_pb2.STATE_CATEGORY_ACTIVE: StateCategory.ACTIVE,
    workflow_pb2.STATE_CATEGORY_DONE: StateCategory.DONE,
    workflow_pb2.STATE_CATEGORY_CANCELLED: StateCategory.CANCELLED,
}
_CATEGORY_TO_PROTO = {category: number for number, category in _CATEGORY_FROM_PROTO.items()}
_GUARD_FROM_PROTO = {
    workflow_pb2.TRANSITION_GUARD_ASSIGNEE_REQUIRED: Guard.ASSIGNEE_REQUIRED,
    workflow_pb2.TRANSITION_GUARD_SUBITEMS_CLOSED: Guard.SUBITEMS_CLOSED,
}
_GUARD_TO_PROTO = {guard: number for number, guard in _GUARD_FROM_PROTO.items()}
_TYPE_FROM_PROTO = {
    workflow_pb2.CUSTOM_FIELD_TYPE_STRING: CustomFieldType.STRING,
    workflow_pb2.CUSTOM_FIELD_TYPE_NUMBER: CustomFieldType.NUMBER,
    workflow_pb2.CUSTOM_FIELD_TYPE_BOOLEAN: CustomFieldType.BOOLEAN,
    workflow_pb2.CUSTOM_FIELD_TYPE_TIMESTAMP: CustomFieldType.TIMESTAMP,
    workflow_pb2.CUSTOM_FIELD_TYPE_ENUM: CustomFieldType.ENUM,
}
_TYPE_TO_PROTO = {kind: number for number, kind in _TYPE_FROM_PROTO.items()}


def workflow_from_message(message: workflow_pb2.Workflow) -> Workflow:
    """The domain form of a contract workflow (not validated: unknown enum numbers become UNSPECIFIED)."""
    return Workflow(
        states=tuple(
            State(s.id, s.display_name, _CATEGORY_FROM_PROTO.get(s.category, StateCategory.UNSPECIFIED))
            for s in message.states
        ),
        transitions=tuple(
            Transition(t.from_state, t.to_state, tuple(_GUARD_FROM_PROTO.get(g, Guard.UNSPECIFIED) for g in t.guards))
            for t in message.transitions
        ),
        initial_state=message.initial_state,
    )


def workflow_message(workflow: Workflow) -> workflow_pb2.Workflow:
    """The contract form of a workflow."""
    return workflow_pb2.Workflow(
        states=[
            workflow_pb2.WorkflowState(id=s.id, display_name=s.display_name, category=_CATEGORY_TO_PROTO[s.category])
            for s in workflow.states
        ],
        transitions=[
            workflow_pb2.Transition(
                from_state=t.from_state, to_state=t.to_state, guards=[_GUARD_TO_PROTO[g] for g in t.guards]
            )
            for t in workflow.transitions
        ],
        initial_state=workflow.initial_state,
    )


def custom_field_from_message(message: workflow_pb2.CustomFieldDefinition) -> CustomFieldDefinition:
    """The domain form of a contract custom field definition (not validated)."""
    return CustomFieldDefinition(
        key=message.key,
        display_name=message.display_name,
        type=_TYPE_FROM_PROTO.get(message.type, CustomFieldType.UNSPECIFIED),
        allowed_values=tuple(message.allowed_values),
    )


def custom_field_message(definition: CustomFieldDefinition) -> workflow_pb2.CustomFieldDefinition:
    """The contract form of a custom field definition."""
    return workflow_pb2.CustomFieldDefinition(
        key=definition.key,
        display_name=definition.display_name,
        type=_TYPE_TO_PROTO[definition.type],
        allowed_values=list(definition.allowed_values),
    )
