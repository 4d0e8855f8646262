"""A plan is the DAG of one reply's valid calls; references (``$c1``) are its edges."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.commands import REF, CommandError, Validated, ValidCall, parse, validate
from switchboard.artifacts import accepted_kinds
from switchboard.expert import artifact_fields


@dataclass
class Plan:
    """Valid calls in reply order plus the errors of the calls that could not be planned."""

    calls: list[ValidCall]
    errors: list[CommandError] = field(default_factory=list)

    @classmethod
    def from_validated(cls, v: Validated) -> Plan:
        return cls(list(v.calls), list(v.errors))

    @classmethod
    def from_text(cls, text: str, registry: Any, **kw: Any) -> Plan:
        return cls.from_validated(validate(parse(text), registry, **kw))

    def levels(self) -> list[list[ValidCall]]:
        """Calls grouped into waves: every call's dependencies are in earlier waves."""
        done: set[str] = set()
        remaining = list(self.calls)
        out: list[list[ValidCall]] = []
        while remaining:
            wave = [c for c in remaining if set(c.depends_on.values()) <= done]
            if not wave:  # validate() removes cycles; this guards hand-built plans
                raise ValueError("plan has a cycle: " + ", ".join(c.id for c in remaining))
            out.append(wave)
            done |= {c.id for c in wave}
            remaining = [c for c in remaining if c.id not in done]
        return out

    def __len__(self) -> int:
        return len(self.calls)


def resolve_args(call: ValidCall, registry: Any, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The call's arguments as JSON, with each ``$id`` replaced by the artifact id that call produced.

    Raises LookupError with a clear message when the referenced call made no artifact of the kind.
    """
    args = call.args.model_dump(mode="json", exclude_unset=True)
    kinds = artifact_fields(registry.get_class(call.expert).Args)
    for arg, ref_id in call.depends_on.items():
        want = kinds[arg]
        accepted = accepted_kinds(want)
        produced = results[ref_id].get("artifacts", [])
        match = next((a for a in produced if a["kind"] == want), None) or next(
            (a for a in produced if a["kind"] in accepted), None)
        if match is None:
            made = ", ".join(f"{a['kind']} {a['id']}" for a in produced) or "nothing"
            raise LookupError(f"argument {arg!r} refers to ${ref_id}, which made no {want} artifact (it made {made})")
        args[arg] = match["id"]
    assert not any(isinstance(v, str) and REF.match(v) for v in args.values())
    return args
