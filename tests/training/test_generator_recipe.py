"""The generator recipe and the generator/editor evals run end to end (a few steps of a tiny UNet)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.generator import (
    HELDOUT_TEMPLATES,
    TRAIN_TEMPLATES,
    all_captions,
    heldout_prompts,
    judge_canvas,
    render_icon,
    sample_batch,
)

pytestmark = pytest.mark.usefixtures("no_network")


def _run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def test_heldout_templates_are_not_trained_on() -> None:
    assert set(HELDOUT_TEMPLATES) - {"a {c} {s}"}, "needs templates training never sees"
    assert not (set(HELDOUT_TEMPLATES) - {"a {c} {s}"}) & set(TRAIN_TEMPLATES)
    prompts = [p for p, *_ in heldout_prompts(60)]
    captions = set(all_captions())
    assert sum(p not in captions for p in prompts) >= 40


def test_icons_are_deterministic_and_labelled() -> None:
    a = render_icon(np.random.Generator(np.random.PCG64(4)), shape="star", colour="blue")
    b = render_icon(np.random.Generator(np.random.PCG64(4)), shape="star", colour="blue")
    assert np.array_equal(a[0], b[0]) and a[1:3] == ("star", "blue")
    imgs, caps = sample_batch(np.random.Generator(np.random.PCG64(1)), 64)
    assert imgs.shape == (64, 32, 32, 3) and imgs.dtype == np.uint8
    assert "" in caps  # classifier-free guidance drops some captions
    assert judge_canvas(imgs[0]).size == (192, 192)


def test_judge_reads_real_icons() -> None:
    # the judge must score real shapes-world icons near perfectly, or generator scores mean nothing
    from training.generator import Judge, score

    rng = np.random.Generator(np.random.PCG64(7))
    wanted = [(s, c) for _, s, c, _ in heldout_prompts(30)]
    images = [judge_canvas(render_icon(rng, shape=s, colour=c)[0]) for s, c in wanted]
    assert score(Judge().top(images), wanted)["prompt_accuracy"] >= 0.9


@pytest.mark.slow
def test_train_resume_export_and_eval(tmp_path: Path) -> None:
    out, pipe = tmp_path / "run", tmp_path / "pipe"
    r = _run(["train", "generator", "--tiny", "--steps", "3", "--save-every", "2", "--eval-every", "0",
              "--batch", "4", "--threads", "1", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 3
    r = _run(["train", "generator", "--resume", "--tiny", "--steps", "5", "--eval-every", "0", "--batch", "4",
              "--threads", "1", "--out", str(out), "--export", str(pipe)])
    assert r.returncode == 0, r.stderr
    assert "resuming at step 3" in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 5
    # a diffusers-style folder: the UNet loads with plain diffusers
    from diffusers import UNet2DConditionModel

    assert UNet2DConditionModel.from_pretrained(pipe / "unet").config.cross_attention_dim == 384
    assert json.loads((pipe / "model_index.json").read_text())["train_steps"] == 5

    r = _run(["eval", "generator", "--model", str(pipe), "--n", "4", "--steps", "2", "--threads", "1", "--json"])
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"prompt_accuracy", "colour_accuracy", "shape_accuracy"} <= res.keys() and res["n"] == 4

    r = _run(["eval", "editor", "--n", "3", "--steps", "2", "--threads", "1", "--json"],
             env={"SWITCHBOARD_GENERATE_MODEL": str(pipe)})
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["n"] == 3 and res["outside_mask_preserved"] == 1.0
    assert {"edit_success", "replace_success", "recolour_success", "remove_success"} <= res.keys()
