"""Workflows and custom fields as data (pure): the default workflow, validation with field paths, values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf import timestamp_pb2

from services.kit.errors import InvalidArgument
from services.workflow.models import timestamp
from services.workflow.workflow import (
    DEFAULT_WORKFLOW,
    CustomFieldDefinition,
    CustomFieldType,
    Guard,
    State,
    StateCategory,
    Transition,
    Workflow,
    custom_field_from_message,
    custom_field_message,
    validate_custom_field_definitions,
    validate_custom_field_value,
    validate_workflow,
    workflow_from_message,
    workflow_message,
)
from tessera.workflow.v1 import workflow_pb2

pytestmark = pytest.mark.gate("S04")

B, A, D, C = StateCategory.BACKLOG, StateCategory.ACTIVE, StateCategory.DONE, StateCategory.CANCELLED


def fields_of(error: InvalidArgument) -> dict[str, str]:
    return {violation.field: violation.description for violation in error.violations}


class TestDefaultWorkflow:
    def test_states_categories_and_initial_state(self) -> None:
        validate_workflow(DEFAULT_WORKFLOW, field="project.workflow")
        assert [(s.id, s.category) for s in DEFAULT_WORKFLOW.states] == [
            ("backlog", B),
            ("todo", B),
            ("in_progress", A),
            ("done", D),
            ("cancelled", C),
        ]
        assert DEFAULT_WORKFLOW.initial_state == "backlog"

    @pytest.mark.parametrize(
        ("status", "allowed"),
        [
            ("backlog", ["todo", "in_progress", "cancelled"]),
            ("todo", ["backlog", "in_progress", "cancelled"]),
            ("in_progress", ["todo", "done", "cancelled"]),
            ("done", ["in_progress"]),
            ("cancelled", ["backlog"]),
        ],
    )
    def test_allowed_next_states(self, status: str, allowed: list[str]) -> None:
        assert DEFAULT_WORKFLOW.allowed_next(status) == allowed

    def test_entering_active_needs_an_assignee_and_done_needs_closed_subitems(self) -> None:
        for source in ("backlog", "todo", "done"):
            transition = DEFAULT_WORKFLOW.check_transition(source, "in_progress")
            assert transition is not None
            assert transition.guards == (Guard.ASSIGNEE_REQUIRED,)
        done = DEFAULT_WORKFLOW.check_transition("in_progress", "done")
        assert done is not None
        assert done.guards == (Guard.SUBITEMS_CLOSED,)
        assert DEFAULT_WORKFLOW.check_transition("backlog", "done") is None
        assert DEFAULT_WORKFLOW.check_transition("cancelled", "in_progress") is None

    def test_json_and_message_round_trips(self) -> None:
        assert Workflow.from_json(DEFAULT_WORKFLOW.to_json()) == DEFAULT_WORKFLOW
        assert workflow_from_message(workflow_message(DEFAULT_WORKFLOW)) == DEFAULT_WORKFLOW
        stored = DEFAULT_WORKFLOW.to_json()
        assert stored["initial"] == "backlog"
        assert stored["states"][2] == {"id": "in_progress", "display_name": "In progress", "category": "ACTIVE"}
        assert {"from": "in_progress", "to": "done", "guards": ["SUBITEMS_CLOSED"]} in stored["transitions"]


class TestWorkflowValidation:
    def test_no_state_and_no_initial_state(self) -> None:
        with pytest.raises(InvalidArgument) as caught:
            validate_workflow(Workflow((), (), ""), field="project.workflow")
        assert fields_of(caught.value) == {
            "project.workflow.states": "must have at least one state",
            "project.workflow.initial_state": "is required",
        }

    def test_every_problem_is_named_by_its_path(self) -> None:
        workflow = Workflow(
            states=(
                State("open", "Open", B),
                State("Bad-Id", "Bad", A),
                State("open", "Again", D),
                State("blank", "  ", StateCategory.UNSPECIFIED),
            ),
            transitions=(
                Transition("open", "nowhere"),
                Transition("ghost", "open"),
                Transition("open", "open"),
                Transition("open", "blank", (Guard.UNSPECIFIED,)),
                Transition("open", "blank", (Guard.ASSIGNEE_REQUIRED,)),
                Transition("blank", "open", (Guard.SUBITEMS_CLOSED, Guard.SUBITEMS_CLOSED)),
            ),
            initial_state="missing",
        )
        with pytest.raises(InvalidArgument) as caught:
            validate_workflow(workflow, field="project.workflow")
        problems = fields_of(caught.value)
        assert set(problems) == {
            "project.workflow.states[1].id",
            "project.workflow.states[2].id",
            "project.workflow.states[3].display_name",
            "project.workflow.states[3].category",
            "project.workflow.transitions[0].to_state",
            "project.workflow.transitions[1].from_state",
            "project.workflow.transitions[2]",
            "project.workflow.transitions[3].guards[0]",
            "project.workflow.transitions[4]",
            "project.workflow.transitions[5].guards[1]",
            "project.workflow.initial_state",
        }
        assert "duplicate state id 'open'" in problems["project.workflow.states[2].id"]
        assert "unknown state 'nowhere'" in problems["project.workflow.transitions[0].to_state"]
        assert "to itself" in problems["project.workflow.transitions[2]"]
        assert "duplicate transition" in problems["project.workflow.transitions[4]"]
        assert "unknown state 'missing'" in problems["project.workflow.initial_state"]

    def test_unknown_enum_numbers_from_the_wire_are_refused(self) -> None:
        message = workflow_pb2.Workflow(
            states=[workflow_pb2.WorkflowState(id="a", display_name="A", category=99)],  # type: ignore[arg-type]  # an undefined enum number, on purpose
            transitions=[],
            initial_state="a",
        )
        with pytest.raises(InvalidArgument) as caught:
            validate_workflow(workflow_from_message(message), field="project.workflow")
        assert list(fields_of(caught.value)) == ["project.workflow.states[0].category"]


class TestCustomFields:
    def test_definitions_validation(self) -> None:
        definitions = [
            CustomFieldDefinition("size", "Size", CustomFieldType.ENUM),
            CustomFieldDefinition("size", "Again", CustomFieldType.NUMBER),
            CustomFieldDefinition("points", "Points", CustomFieldType.NUMBER, ("1", "2")),
            CustomFieldDefinition("kind", "Kind", CustomFieldType.ENUM, ("a", "a", " ")),
            CustomFieldDefinition("9lives", "", CustomFieldType.UNSPECIFIED),
        ]
        with pytest.raises(InvalidArgument) as caught:
            validate_custom_field_definitions(definitions, field="project.custom_fields")
        problems = fields_of(caught.value)
        assert set(problems) == {
            "project.custom_fields[0].allowed_values",
            "project.custom_fields[1].key",
            "project.custom_fields[2].allowed_values",
            "project.custom_fields[3].allowed_values[1]",
            "project.custom_fields[3].allowed_values[2]",
            "project.custom_fields[4].key",
            "project.custom_fields[4].display_name",
            "project.custom_fields[4].type",
        }
        assert "needs at least one allowed value" in problems["project.custom_fields[0].allowed_values"]
        assert "only ENUM fields" in problems["project.custom_fields[2].allowed_values"]

    def test_message_round_trip(self) -> None:
        definition = CustomFieldDefinition("size", "Size", CustomFieldType.ENUM, ("s", "m"))
        assert custom_field_from_message(custom_field_message(definition)) == definition

    @pytest.mark.parametrize(
        ("kind", "value", "stored"),
        [
            (CustomFieldType.STRING, "x", "x"),
            (CustomFieldType.NUMBER, 3.0, 3),
            (CustomFieldType.NUMBER, 2.5, 2.5),
            (CustomFieldType.BOOLEAN, False, False),
            (CustomFieldType.TIMESTAMP, "2026-03-01T10:00:00+02:00", "2026-03-01T08:00:00Z"),
            (CustomFieldType.ENUM, "high", "high"),
        ],
    )
    def test_valid_values_are_stored_normalised(self, kind: CustomFieldType, value: object, stored: object) -> None:
        definition = CustomFieldDefinition("f", "F", kind, ("low", "high") if kind is CustomFieldType.ENUM else ())
        assert validate_custom_field_value(definition, value, path="item.custom_fields.f") == stored

    @pytest.mark.parametrize(
        ("kind", "value"),
        [
            (CustomFieldType.STRING, 5),
            (CustomFieldType.STRING, "x" * 1001),
            (CustomFieldType.NUMBER, "5"),
            (CustomFieldType.NUMBER, True),
            (CustomFieldType.NUMBER, float("inf")),
            (CustomFieldType.BOOLEAN, 1),
            (CustomFieldType.TIMESTAMP, "tomorrow"),
            (CustomFieldType.TIMESTAMP, "2026-03-01T10:00:00"),
            (CustomFieldType.TIMESTAMP, "2026-03-01"),
            (CustomFieldType.ENUM, "medium"),
        ],
    )
    def test_type_errors_name_the_custom_field(self, kind: CustomFieldType, value: object) -> None:
        definition = CustomFieldDefinition("f", "F", kind, ("low", "high") if kind is CustomFieldType.ENUM else ())
        with pytest.raises(InvalidArgument) as caught:
            validate_custom_field_value(definition, value, path="item.custom_fields.f")
        assert [v.field for v in caught.value.violations] == ["item.custom_fields.f"]


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 11, 29, 23, 30, 1, 123456, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # before the epoch: nanos stay positive
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 3, 29, 2, 30, tzinfo=timezone(timedelta(hours=-7, minutes=-30))),
    ],
)
def test_timestamp_matches_protobufs_own_conversion(value: datetime) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(value)
    assert timestamp(value) == expected


def test_timestamp_refuses_a_naive_datetime() -> None:
    with pytest.raises(TypeError):
        timestamp(datetime(2026, 1, 1))  # the point of the test
