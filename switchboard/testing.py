"""The contract every expert passes, built-in or plugin. Inherit it in the expert's pytest class::

    class TestDetect(ExpertContract):
        expert_cls = DetectExpert

        def make_args(self, store):          # valid arguments on tiny inputs
            img = store.put_image(some_pil_image)
            return {"image": img.id, "query": "red circle"}

Everything runs on the CPU with the expert's small default model.
"""

from __future__ import annotations

import json
import time
from typing import Any, ClassVar

import pytest
from pydantic import ValidationError

from switchboard.artifacts import ArtifactStore, is_artifact_id
from switchboard.expert import Expert, ExpertResult, RunContext, artifact_fields
from switchboard.registry import Registry, get_registry


class ExpertContract:
    """Pytest mixin. Set ``expert_cls`` and implement ``make_args``; override ``invalid_args`` if useful."""

    expert_cls: ClassVar[type[Expert]]
    #: checked by test_setup_is_lazy: constructing must be much cheaper than this
    construct_budget_s: ClassVar[float] = 0.5

    def make_args(self, store: ArtifactStore) -> dict[str, Any]:
        raise NotImplementedError

    def invalid_args(self, store: ArtifactStore) -> list[dict[str, Any]]:
        """Argument sets that must be refused by ``Args`` (defaults: nothing, and an unknown argument)."""
        good = self.make_args(store)
        return [{}, {**good, "no_such_argument_xyz": 1}]

    @pytest.fixture
    def contract_store(self, tmp_path) -> ArtifactStore:
        return ArtifactStore(tmp_path / "artifacts")

    @pytest.fixture
    def expert(self) -> Expert:
        return self.expert_cls()

    def _run(self, expert: Expert, store: ArtifactStore, args: dict[str, Any]) -> ExpertResult:
        events: list[tuple[float, str]] = []
        ctx = RunContext(store, call_id="c1", conversation_id="conv-test", registry=get_registry(),
                         progress=lambda f, m: events.append((f, m)))
        result = expert(args, ctx)
        assert all(0.0 <= f <= 1.0 for f, _ in events)
        return result

    # -- declaration ----------------------------------------------------------------------------
    def test_declaration(self) -> None:
        cls = self.expert_cls
        assert cls.name and cls.description.strip()
        schema = cls.Args.model_json_schema()
        assert schema["type"] == "object"
        json.dumps(schema)  # must be JSON for the grammar, the API and `switchboard experts --json`
        assert cls.examples, "an expert needs examples: they seed the core's training data"
        for ex in cls.examples:
            _, args = ex.fill()
            cls.Args.model_validate(args)

    def test_registers(self) -> None:
        reg = Registry()
        reg.register(self.expert_cls, "contract-test")
        assert reg.get_class(self.expert_cls.name) is self.expert_cls
        assert reg.describe()[0]["args_schema"] == self.expert_cls.Args.model_json_schema()

    def test_setup_is_lazy(self) -> None:
        t0 = time.perf_counter()
        inst = self.expert_cls()
        assert time.perf_counter() - t0 < self.construct_budget_s, "construction must not load models"
        assert not inst.is_setup

    def test_rejects_invalid_args(self, contract_store: ArtifactStore) -> None:
        for bad in self.invalid_args(contract_store):
            with pytest.raises(ValidationError):
                self.expert_cls.Args.model_validate(bad)

    # -- running --------------------------------------------------------------------------------
    def test_run_returns_result_with_artifacts_in_store(self, expert: Expert, contract_store: ArtifactStore) -> None:
        result = self._run(expert, contract_store, self.make_args(contract_store))
        assert isinstance(result, self.expert_cls.Result)
        assert result.summary.strip() and "\n" not in result.summary.strip(), "summary must be one line"
        for art in result.artifacts:
            assert is_artifact_id(art.id)
            meta = contract_store.get(art.id)
            assert meta.kind == art.kind
            assert meta.call_id == "c1"
        # results travel through Celery as JSON
        again = self.expert_cls.Result.model_validate_json(result.model_dump_json())
        assert again == result

    def test_setup_runs_once(self, expert: Expert, contract_store: ArtifactStore) -> None:
        args = self.make_args(contract_store)
        calls = 0
        original = expert.setup

        def counting() -> None:
            nonlocal calls
            calls += 1
            original()

        expert.setup = counting  # type: ignore[method-assign]
        self._run(expert, contract_store, args)
        self._run(expert, contract_store, args)
        assert calls == 1

    def test_run_batch_matches_run(self, expert: Expert, contract_store: ArtifactStore) -> None:
        args = self.expert_cls.Args.model_validate(self.make_args(contract_store))
        expert.ensure_setup()
        single = expert.run(args, RunContext(contract_store, call_id="c1", registry=get_registry()))
        batch = expert.run_batch([(args, RunContext(contract_store, call_id="c1", registry=get_registry())),
                                  (args, RunContext(contract_store, call_id="c2", registry=get_registry()))])
        assert len(batch) == 2
        assert [a.kind for a in batch[0].artifacts] == [a.kind for a in single.artifacts]
        assert batch[0].summary == single.summary

    def test_artifact_arguments_are_refs(self) -> None:
        # arguments that carry images/masks/boxes must be declared with ImageRef/MaskRef/BoxesRef,
        # so commands can reference other calls' results and the grammar knows them
        for name in self.expert_cls.Args.model_fields:
            if name in ("image", "mask", "boxes"):
                assert name in artifact_fields(self.expert_cls.Args), f"{name} must be an artifact ref"
