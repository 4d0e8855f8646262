"""The core's linear layers packed for oneDNN (orchestrator.core.packed): the same outputs as nn.Linear
(to float rounding), each row independent of the others in the call, and only float32 CPU layers."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from orchestrator.core import packed  # noqa: E402

pytestmark = pytest.mark.skipif(not packed.available(), reason="this PyTorch build has no oneDNN packed linear")


def _stack() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.SiLU(), torch.nn.Linear(96, 40, bias=False)).eval()


def test_packed_layers_compute_what_the_linear_layers_compute() -> None:
    model = _stack()
    x = torch.randn(2, 7, 48)  # any leading shape
    with torch.inference_mode():
        want = model(x)
    assert packed.pack_linears(model) == 2
    assert all(type(m).__name__ == "PackedLinear" for m in (model[0], model[2]))
    with torch.inference_mode():
        got = model(x)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_a_rows_output_does_not_depend_on_the_other_rows() -> None:
    """What makes a batched pass give each turn exactly its pass alone: one row, a few, and more rows
    than one oneDNN call takes (the chunked path) give each row the same bits."""
    model = _stack()
    packed.pack_linears(model)
    x = torch.randn(packed.CHUNK + 37, 48)
    with torch.inference_mode():
        whole = model(x)
        for rows in (slice(0, 1), slice(3, 5), slice(10, 26), slice(packed.CHUNK - 2, packed.CHUNK + 3)):
            assert torch.equal(model(x[rows]), whole[rows])


def test_only_float32_cpu_layers_outside_the_image_side_are_packed() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8).to(torch.bfloat16))
    model.multi_modal_projector = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert packed.pack_linears(model) == 1
    assert type(model[1]) is torch.nn.Linear and type(model.multi_modal_projector[0]) is torch.nn.Linear


def test_the_shipped_core_loads_packed_and_plans_as_before() -> None:
    """Loading packs the shipped core's linear layers (on a CPU) and the greedy plans of held-out
    requests are the ones the unpacked core gives."""
    from pathlib import Path

    from orchestrator.core import model as cm

    if not (Path(__file__).resolve().parents[3] / "models" / "core" / "core.json").exists():
        pytest.skip("no shipped core")
    from orchestrator.core.grammar import CommandGrammar
    from orchestrator.core.handles import Handles
    from orchestrator.runtime import sees_pixels
    from training.core import _Images
    from training.core_data import Generator, data_registry

    fast, plain = cm.CoreModel.load(device="cpu"), cm.CoreModel.load(device="cpu", pack=False)
    assert fast.info["packed_linears"] > 200 and "packed_linears" not in plain.info
    # the image side is left as it is: the runtime reads the projector's weights (a zero projector =
    # a core that cannot see, whose image questions are answered from the detector)
    assert sees_pixels(fast) == sees_pixels(plain)
    registry = data_registry()
    images = _Images()
    samples = [s for s in Generator(split="heldout", seed=10_004, n_scenes=16).generate(8) if s.kind != "fusion"][:4]
    for s in samples:
        arts = {aid: aid.split("-")[0] for aid in s.images}
        h = Handles.for_conversation(s.messages, arts)
        msgs, ims = h.messages(s.messages), h.images({a: images(sd) for a, sd in s.images.items()})
        grammar = CommandGrammar.from_registry(registry, h.artifacts(arts), canonical=True)
        assert fast.decode(msgs, ims, grammar=grammar, max_new_tokens=60).text == \
            plain.decode(msgs, ims, grammar=grammar, max_new_tokens=60).text
