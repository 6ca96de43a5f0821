"""Marks a user gives shown results (relevant or not), each case standing for the item it matched best when marked.

Kept apart from :mod:`feedback` (which searches again with them) because a query carries its marks
(:class:`queries.QuerySpec`'s ``feedback``), and the answer repeats them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ParameterError


@dataclass
class Feedback:
    """Marked cases: case id -> the item it matched best when marked (None: its best item is looked up)."""

    relevant: dict[str, int | None] = field(default_factory=dict)
    not_relevant: dict[str, int | None] = field(default_factory=dict)

    @property
    def judged(self) -> list[str]:
        """Every marked case id."""
        return list(dict.fromkeys([*self.relevant, *self.not_relevant]))

    def __bool__(self) -> bool:
        return bool(self.relevant or self.not_relevant)

    def mark(self, case_id: str, item_id: int | None, relevant: bool | None) -> None:
        """Mark a case relevant (True), not relevant (False), or clear its mark (None); the latest mark wins."""
        self.relevant.pop(case_id, None)
        self.not_relevant.pop(case_id, None)
        if relevant is not None:
            (self.relevant if relevant else self.not_relevant)[case_id] = item_id

    def to_json(self) -> dict:
        """The answer's ``query.feedback``."""
        return {"relevant": dict(self.relevant), "not_relevant": dict(self.not_relevant)}

    @classmethod
    def from_json(cls, data: object) -> Feedback:
        """Back from JSON: ``{case id: item id}`` per side, or a plain list of case ids (items looked up when used)."""
        data = data or {}
        if not isinstance(data, dict):
            raise ParameterError(f"feedback marks must be {{'relevant': ..., 'not_relevant': ...}}, not {type(data).__name__}")
        return cls(_side(data.get("relevant")), _side(data.get("not_relevant")))


def _side(marks: object) -> dict[str, int | None]:
    """One side of the marks: {case id: item id or None}, or a list of case ids; anything else is a ParameterError."""
    if isinstance(marks, list) and all(isinstance(k, str) for k in marks):
        return {k: None for k in marks}
    marks = marks or {}
    if not isinstance(marks, dict) or any(v is not None and (isinstance(v, bool) or not isinstance(v, int)) for v in marks.values()):
        raise ParameterError("feedback marks must map case ids to item ids (whole numbers), or list case ids")
    return {str(k): v for k, v in marks.items()}
