"""What `featshard verify` found: `Report` (problems with counts and first example rows, warnings, counts, failure
reasons) and its text rendering; `Hits` collects the rows failing one check without keeping them all."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

EXAMPLES = 5


@dataclass
class Report:
    run_dir: str
    rows: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    reasons: Counter[str] = field(default_factory=Counter)

    def problem(self, check: str, message: str, rows: Any = ()) -> None:
        rows = [int(r) for r in list(rows)[:EXAMPLES]] if len(rows) else []
        self.problems.append({"check": check, "message": message, **({"examples": rows} if rows else {})})

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "run_dir": self.run_dir, "rows": self.rows, "counts": self.counts,
                "failure_reasons": dict(sorted(self.reasons.items())), "problems": self.problems,
                "warnings": self.warnings}


class Hits:
    """Rows failing one check: how many, and the first few (a broken run of millions of rows stays cheap)."""

    def __init__(self) -> None:
        self.count, self.examples = 0, list[int]()

    def add(self, rows: Any) -> None:
        rows = list(rows)
        self.count += len(rows)
        self.examples += rows[: max(0, EXAMPLES - len(self.examples))]

    def report(self, rep: Report, check: str, message: str) -> None:
        if self.count:
            rep.problem(check, message.format(n=self.count), self.examples)


def render(rep: Report) -> str:
    c = rep.counts
    head = (f"{rep.rows} rows: {c.get('feature_rows', 0)} with a feature, {c.get('failed_rows', 0)} failed"
            + (f" ({', '.join(f'{k} {v}' for k, v in sorted(rep.reasons.items()))})" if rep.reasons else "")
            + (f"; index holds {c['index_ntotal']} vectors" if "index_ntotal" in c else ""))
    lines = [f"verify {rep.run_dir}: {'OK' if rep.ok else 'FAILED'}: {head}"]
    for p in rep.problems:
        ex = p.get("examples", [])
        ex = f" (e.g. row{'s' if len(ex) > 1 else ''} {', '.join(map(str, ex))})" if ex else ""
        lines.append(f"  problem [{p['check']}] {p['message']}{ex}")
    lines += [f"  warning: {w}" for w in rep.warnings]
    if rep.ok:
        lines.append("  every input row is accounted for exactly once")
    return "\n".join(lines)
