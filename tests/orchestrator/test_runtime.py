"""The composition root's judgement of whether a core's image input depends on the pixels."""

from __future__ import annotations

import torch

from orchestrator.runtime import sees_pixels


class _Projector(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear_1 = torch.nn.Linear(4, 8)
        self.linear_2 = torch.nn.Linear(8, 8)


class _Llava(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.multi_modal_projector = _Projector()


class _Core:
    def __init__(self) -> None:
        self.model = _Llava()


def test_a_zero_output_projector_sees_nothing() -> None:
    core = _Core()
    assert sees_pixels(core)
    with torch.no_grad():
        core.model.multi_modal_projector.linear_2.weight.zero_()
        core.model.multi_modal_projector.linear_2.bias.zero_()
    assert not sees_pixels(core)
    assert sees_pixels(object())  # a core that is not LLaVA-style (a remote one): assumed to see
