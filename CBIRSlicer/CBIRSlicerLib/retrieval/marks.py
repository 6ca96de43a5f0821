"""Marks a user gives shown results (relevant or not), each case standing for the item it matched best when marked.

Kept apart from :mod:`feedback` (which searches again with them) because a query carries its marks
(:class:`queries.QuerySpec`'s ``feedback``), and the answer repeats them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    def from_json(cls, data: dict | None) -> Feedback:
        """Back from JSON: ``{case id: item id}`` per side, or a plain list of case ids (items looked up when used)."""
        data = data or {}

        def side(marks) -> dict[str, int | None]:
            return {str(k): None for k in marks} if isinstance(marks, list) else {str(k): v for k, v in (marks or {}).items()}

        return cls(side(data.get("relevant")), side(data.get("not_relevant")))
