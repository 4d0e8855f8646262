"""Core recipe: pretrain the vision tower on the shapes world, then invocation-tune the VLM.

    switchboard train core                       # the shipped core (models/core, see its MODEL_CARD.md)
    switchboard train core --tiny --out /tmp/c   # CI smoke: tiny random LM, a few steps, seconds
    switchboard train core --resume              # continue the last run from its checkpoint
    switchboard train core --average A B --out C # C = the weight average of cores A and B (one lineage)
    switchboard eval core --json [--n N]         # held-out templates + human-phrased requests
    switchboard eval core --set wild --json      # requests written by others (training/wild.py)

Stage 1 (``vision``): the tiny CLIP ViT learns to count objects per colour, shape and colour×shape
on shapes-world scenes (cheap: minutes on one core). Stage 2 (``tune``): SmolLM2 + LoRA (r 16, all
linear layers of the LM) and the projector learn from ``training.core_data`` samples, loss on
the assistant answer only. Checkpoints (the small parts + optimizer state) are written every
``--save-every`` steps into ``--out``, so a run stopped early still leaves a usable core, and
``--resume`` continues from there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from experts.detect import singular  # light: no model or torch import

VISION_SEED = 31_000       # dataset seed of the vision pretraining scenes
VISION_EVAL_SEED = 31_001  # ... and of its held-out check
COUNT_HEADS = None         # filled lazily: (colours, shapes, colour×shape) label order


def _settings():
    from switchboard.settings import get_settings

    return get_settings()


def _threads(n: int) -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def work_dir() -> Path:
    return Path(_settings().cache_dir) / "core"


# -- stage 1: the vision tower ----------------------------------------------------------------------
def _count_labels() -> list[str]:
    from training.shapes import COLOURS, SHAPES

    return [*COLOURS, *SHAPES, *(f"{c} {s}" for c in COLOURS for s in SHAPES)]


def _scene_arrays(dataset_seed: int, n: int, image_size: int, desc: str):
    """(images uint8 N×S×S×3, count targets N×41) for ``n`` scenes, cached as .npz in the work dir."""
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from training.shapes import make_scene, scene_seed

    path = work_dir() / f"vision_{dataset_seed}_{n}_{image_size}.npz"
    if path.exists():
        d = np.load(path)
        return d["x"], d["y"]
    labels = _count_labels()
    index = {k: i for i, k in enumerate(labels)}
    xs = np.zeros((n, image_size, image_size, 3), np.uint8)
    ys = np.zeros((n, len(labels)), np.float32)
    for i in tqdm(range(n), desc=desc, unit="scene"):
        sc = make_scene(scene_seed(dataset_seed, i), size=128)
        xs[i] = np.asarray(sc.image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR))
        for o in sc.objects:
            for key in (o.colour, o.shape, f"{o.colour} {o.shape}"):
                ys[i, index[key]] += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, x=xs, y=ys)
    return xs, ys


def pretrain_vision(*, steps: int = 3000, n_scenes: int = 6000, batch: int = 64, tiny: bool = False,
                    out: Path | None = None, log: Any = print) -> Path:
    """Train the vision tower to count (per colour, shape, colour×shape); save it; return the path."""
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import CLIPVisionModel

    from orchestrator.core.model import IMAGE_MEAN, IMAGE_SIZE, IMAGE_STD, vision_config

    out = out or work_dir() / ("vision_tiny.safetensors" if tiny else "vision.safetensors")
    torch.manual_seed(0)
    xs, ys = _scene_arrays(VISION_SEED, n_scenes, IMAGE_SIZE, "vision scenes")
    xv, yv = _scene_arrays(VISION_EVAL_SEED, min(500, n_scenes), IMAGE_SIZE, "vision held-out")
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)

    def prep(a: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0 - mean) / std

    cfg = vision_config(tiny)
    tower = CLIPVisionModel(cfg)
    head = torch.nn.Linear(cfg.hidden_size, ys.shape[1])
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)

    def predict(x: torch.Tensor) -> torch.Tensor:
        hs = tower(pixel_values=x, output_hidden_states=True).hidden_states[-1][:, 1:]  # what LLaVA reads
        return head(hs.mean(1))

    rng = np.random.default_rng(0)
    bar = tqdm(range(steps), desc="vision", unit="step")
    for step in bar:
        idx = rng.integers(0, len(xs), batch)
        x = prep(xs[idx])
        if rng.random() < 0.5:
            x = x.flip(3)  # counts do not change under a mirror
        loss = torch.nn.functional.smooth_l1_loss(predict(x), torch.from_numpy(ys[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    with torch.inference_mode():
        pred = torch.cat([predict(prep(xv[i:i + 128])) for i in range(0, len(xv), 128)]).round()
    exact = (pred.numpy() == yv)
    n_col = 6
    log(f"vision: held-out count accuracy colour {exact[:, :n_col].mean():.3f} shape "
        f"{exact[:, n_col:n_col + 5].mean():.3f} colour×shape {exact[:, n_col + 5:].mean():.3f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"vision_tower." + k: v.contiguous() for k, v in tower.state_dict().items()}, str(out))
    return out


# -- stage 2: invocation tuning ---------------------------------------------------------------------
def default_out() -> Path:
    return Path(_settings().models_dir) / "core"


def _state_path(out: Path) -> Path:
    """Optimizer state lives in the cache (tens of MB, never committed)."""
    import hashlib

    tag = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:10]
    return work_dir() / f"trainer_state-{out.name}-{tag}.pt"


DEFAULT_LORA_LAYERS = 15


class AdapterLayersError(ValueError):
    """Resuming with LoRA layers that do not cover the saved adapter's."""


def adapter_layers(path: Path) -> list[int]:
    """The decoder layers a saved LoRA adapter (``adapter_model.safetensors``) has weights for."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return sorted({int(m.group(1)) for k in f.keys() if "lora_" in k
                       for m in [re.search(r"\.layers\.(\d+)\.", k)] if m})


def lora_layer_set(lora_layers: int | None, n_layers: int, saved: Path | None) -> list[int] | None:
    """The decoder layers to put LoRA on (None = all): the top ``lora_layers`` (0 = all); when None,
    those of the adapter being resumed (``saved``), else the top DEFAULT_LORA_LAYERS. A resumed
    adapter's layers must all be kept — dropping some would silently discard what they learnt."""
    have = adapter_layers(saved) if saved is not None else []
    if lora_layers is None:
        lora_layers = (n_layers - have[0]) if have else DEFAULT_LORA_LAYERS
    layers = list(range(n_layers - lora_layers, n_layers)) if 0 < lora_layers < n_layers else None
    if layers is not None and not set(have) <= set(layers):
        raise AdapterLayersError(f"the adapter in {saved.parent} has LoRA weights on decoder layers {have[0]}-{have[-1]}; "
                         f"--lora-layers {lora_layers} (layers {layers[0]}-{layers[-1]}) would drop some of them: "
                         f"pass --lora-layers {n_layers - have[0] if have[0] else 0} or more, or leave it out")
    return layers


def _add_lora(model: Any, *, n_layers: int, out: Path, resumed: bool, lora_r: int, lora_layers: int | None):
    """``model`` as a peft model with LoRA on the layers ``lora_layer_set`` picks, holding the
    resumed adapter's weights (all of them: a weight with no place in the model is an error)."""
    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from orchestrator.core import model as cm

    saved = out / "adapter" / "adapter_model.safetensors"
    saved = saved if resumed and saved.exists() else None
    model = get_peft_model(model, cm.lora_config(r=lora_r, layers=lora_layer_set(lora_layers, n_layers, saved)))
    if saved is not None:
        res = set_peft_model_state_dict(model, load_file(str(saved)))
        lost = [k for k in getattr(res, "unexpected_keys", ()) if "lora_" in k]
        if lost:
            raise AdapterLayersError(f"{saved}: {len(lost)} LoRA weights have no place in this model (e.g. {lost[0]})")
    return model


def build_trainable(*, tiny: bool, out: Path, resume: bool, lora_r: int = 16, lora_layers: int | None = None,
                    train_vision: bool = False, base: Path | None = None, log: Any = print):
    """A CoreModel whose ``.model`` is a peft model: LoRA on the LM (on its top ``lora_layers``
    decoder layers, all when 0, those of the resumed adapter when None — see ``lora_layer_set``);
    the projector trains when ``train_vision``. Without it, the
    embedded default's fresh projector is frozen with a zero output layer (image tokens are then
    blank, and backpropagation stops at the lowest LoRA layer — what makes a CPU run affordable);
    a ``base`` LLaVA checkpoint keeps its own trained projector."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from orchestrator.core import model as cm

    resumed = resume and (out / "core.json").exists()
    if base is not None:
        return _trainable_from_base(Path(base), out=out, resumed=resumed, lora_r=lora_r, lora_layers=lora_layers,
                                    train_vision=train_vision)
    if resumed:
        tok_dir = out / "tokenizer"
    elif tiny and (default_out() / "tokenizer").exists():
        tok_dir = default_out() / "tokenizer"  # the shipped tokenizer: CI needs no GGUF conversion
    else:
        tok_dir = cm.base_lm_dir()
    tokenizer = cm.load_tokenizer(tok_dir)
    image_id = tokenizer.convert_tokens_to_ids(cm.IMAGE_TOKEN)
    if tiny:
        torch.manual_seed(0)
        text_cfg = cm.tiny_text_config(len(tokenizer))
        from transformers import LlamaForCausalLM

        lm_state = (load_file(str(out / "lm.safetensors")) if resumed
                    else LlamaForCausalLM(text_cfg).state_dict())
        vstate = None
    else:
        base = cm.base_lm_dir()
        text_cfg = AutoConfig.from_pretrained(str(base))
        text_cfg.vocab_size = len(tokenizer)
        lm_state = load_file(str(base / "model.safetensors"))
        vpath = work_dir() / "vision.safetensors"
        if resumed and (out / "vision.safetensors").exists():
            vstate = None  # the resumed core's own tower and projector are loaded below
        else:
            if not vpath.exists():
                log("core: no pretrained vision tower yet; pretraining it first")
                pretrain_vision()
            vstate = load_file(str(vpath))
    config = cm.llava_config(text_cfg, cm.vision_config(tiny), image_id)
    model = cm.assemble(config, lm_state, vstate)
    if not train_vision:
        proj = model.model.multi_modal_projector
        torch.nn.init.zeros_(proj.linear_2.weight)
        torch.nn.init.zeros_(proj.linear_2.bias)
    if resumed and (out / "vision.safetensors").exists():
        vs = load_file(str(out / "vision.safetensors"))
        missing = model.model.load_state_dict({k: v for k, v in vs.items()}, strict=False).missing_keys
        lacking = [k for k in missing if k.startswith(("vision_tower.", "multi_modal_projector."))]
        if lacking:
            raise RuntimeError(f"core: {out / 'vision.safetensors'} lacks {lacking[:5]}")
    model = _add_lora(model, n_layers=text_cfg.num_hidden_layers, out=out, resumed=resumed, lora_r=lora_r,
                      lora_layers=lora_layers)
    inner = model.get_base_model().model
    for p in inner.multi_modal_projector.parameters():
        p.requires_grad_(train_vision)
    for p in inner.vision_tower.parameters():
        p.requires_grad_(train_vision and tiny)  # the shapes-world tower is pretrained and stays frozen
    core = cm.CoreModel(model, tokenizer, info={"base": "included" if tiny else cm.BASE_NAME})
    core.lm_state = lm_state if tiny else None
    return core


def _trainable_from_base(base: Path, *, out: Path, resumed: bool, lora_r: int, lora_layers: int | None,
                         train_vision: bool):
    """LoRA on a full LLaVA-family checkpoint (a bigger core, on a GPU): same data, same loss."""
    from safetensors.torch import load_file

    from orchestrator.core import model as cm

    core = cm.CoreModel._load_llava(base)
    model = core.model
    if resumed and (out / "vision.safetensors").exists():
        model.model.load_state_dict(load_file(str(out / "vision.safetensors")), strict=False)
    model = _add_lora(model, n_layers=model.config.text_config.num_hidden_layers, out=out, resumed=resumed,
                      lora_r=lora_r, lora_layers=lora_layers)
    inner = model.get_base_model().model
    for p in inner.multi_modal_projector.parameters():
        p.requires_grad_(train_vision)
    core.model = model
    core.info = {"base": str(base.resolve())}
    core.lm_state = None
    return core


PROJECTOR_SUFFIX = ".projector.safetensors"  # a snapshot's projector, beside its step-N.safetensors
_PROJECTOR = "multi_modal_projector."  # key prefix of the projector in vision.safetensors


def save_parts(core: Any, out: Path, *, meta: dict[str, Any]) -> None:
    """Write the small trained parts (see orchestrator/core/model.py) atomically-enough into ``out``."""
    from safetensors.torch import save_file

    from orchestrator.core import model as cm

    out.mkdir(parents=True, exist_ok=True)
    peft_model = core.model
    tmp = out / ".adapter.tmp"
    peft_model.save_pretrained(str(tmp))
    if (out / "adapter").exists():
        shutil.rmtree(out / "adapter")
    tmp.rename(out / "adapter")
    vstate = cm.vision_state_dict(peft_model)
    if core.info.get("base") not in ("included", cm.BASE_NAME):  # a LLaVA base keeps its own tower
        vstate = {k: v for k, v in vstate.items() if k.startswith(_PROJECTOR)}
    save_file(vstate, str(out / "vision.safetensors"))
    peft_model.get_base_model().config.save_pretrained(str(out))
    core.tokenizer.save_pretrained(str(out / "tokenizer"))
    if getattr(core, "lm_state", None) is not None:
        tied = peft_model.get_base_model().config.tie_word_embeddings
        save_file({k: v.detach().clone().contiguous() for k, v in core.lm_state.items()
                   if not (tied and k == "lm_head.weight")}, str(out / "lm.safetensors"))
    full = {"format": cm.CORE_FORMAT, "base": core.info.get("base", cm.BASE_NAME), "image_size": core.image_size,
            "image_mean": list(core.image_mean), "image_std": list(core.image_std),
            "experts": core.info.get("experts"), **meta}
    if core.info.get("handles_share"):  # the share of training conversations written with short handles
        full["handles_share"] = core.info["handles_share"]
    (out / "core.json").write_text(json.dumps(full, indent=1) + "\n")


class _Images:
    """Scene pixels by seed (rendered once per process)."""

    def __init__(self) -> None:
        self.cache: dict[int, Any] = {}

    def __call__(self, seed: int):
        from training.core_data import scene_image

        im = self.cache.get(seed)
        if im is None:
            if len(self.cache) > 2000:
                self.cache.clear()
            im = self.cache[seed] = scene_image(seed)
        return im


def encode_sample(core: Any, sample: Any, images: _Images) -> dict[str, Any]:
    return core.encode(sample.messages, {aid: images(seed) for aid, seed in sample.images.items()},
                       answer=sample.answer)


def train(*, out: Path, steps: int, batch: int, minutes: float | None, resume: bool, tiny: bool,
          save_every: int, seed: int, lr: float, max_len: int, threads: int, lora_layers: int | None = None,
          train_vision: bool = False, base: Path | None = None, snapshot_every: int = 0,
          align: bool = False, handles: float = 0.0, log: Any = print) -> dict[str, Any]:
    """The invocation-tuning loop. Samples are generated on the fly (never repeated); the learning rate
    follows a cosine over max(step / steps, elapsed / minutes), so a time-boxed run still anneals.
    ``snapshot_every`` > 0 also keeps a copy of the adapter every that many steps in
    ``out/snapshots/`` for ``average_cores`` (weight averaging along the run), and of the projector
    when it trains (``step-N.projector.safetensors``).

    ``align`` is LLaVA's stage 1 (feature alignment) on a trained core: only the projector trains
    (the LoRA adapter and the LM stay frozen), on questions about the attached image answered from its
    pixels (describe it, its background), so image tokens start to carry what the image shows.

    ``handles`` is the share of training conversations written with short handles (``img1``,
    ``mask1`` …: ``training.core_data.with_handles``, as the loop shows them to a core) instead of
    artifact ids; the rest keep their ids, so the core reads both."""
    import torch
    from tqdm import tqdm

    from orchestrator.core.phrases import PHRASES_FILE, write_phrases
    from training.core_data import Generator, with_handles

    if not 0.0 <= handles <= 1.0:
        raise ValueError(f"handles must be a share between 0 and 1, got {handles}")
    _threads(threads)
    torch.manual_seed(seed)
    core = build_trainable(tiny=tiny, out=out, resume=resume, lora_layers=lora_layers,
                           train_vision=train_vision or align, base=base, log=log)
    model = core.model
    if align:
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(False)
    if torch.cuda.is_available():
        model.to("cuda")
    model.train()
    state_path = _state_path(out)
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    opt = torch.optim.AdamW([{"params": lora, "lr": lr}, {"params": rest, "lr": lr * 3}], weight_decay=0.0)
    start_step, history, spent = 0, [], 0.0
    if resume and state_path.exists() and (out / "core.json").exists():
        st = torch.load(state_path, weights_only=False)
        if [len(g["params"]) for g in st["optimizer"]["param_groups"]] == [len(g["params"]) for g in opt.param_groups]:
            opt.load_state_dict(st["optimizer"])
        else:  # the adapter gained layers (a wider --lora-layers): their moments start from zero
            log("core: the trainable parameters changed since the checkpoint; starting a fresh optimizer")
        start_step, history, spent = st["step"], st["history"], st.get("elapsed", 0.0)
        log(f"core: resuming from step {start_step} ({spent / 60:.1f} min spent)")
    n_train = sum(p.numel() for p in lora + rest)
    log(f"core: {n_train / 1e6:.2f}M trainable parameters{' (projector only: --align)' if align else ''}; "
        f"batch {batch}; up to {steps} steps"
        + (f" or {minutes:.0f} min" if minutes else ""))
    gen = Generator(split="train", seed=seed + start_step, n_scenes=24 if tiny or steps * batch < 400 else 400)
    core.info["experts"] = {n: gen.registry.package_of(n) for n in gen.registry.names()}
    if not (out / PHRASES_FILE).exists():
        write_phrases(out, answer_phrases(PHRASES_SAMPLES // 10 if tiny else PHRASES_SAMPLES, registry=gen.registry))
    if handles:  # the assembly record says the core reads short handles too
        core.info["handles_share"] = handles
    images = _Images()
    budget = (minutes or 0) * 60
    t0 = time.time() - spent
    warm = max(1, min(30, steps // 10))
    pool: list[dict[str, Any]] = []
    bar = tqdm(range(start_step, steps), desc="core", unit="step", initial=start_step, total=steps)
    step = start_step
    for step in bar:
        if not pool:
            # a pool of 4 batches sorted by length: little padding per batch
            drawn = gen.generate(batch * 4, "describe" if align else None)
            if handles:
                mix = random.Random(f"handles:{seed}:{step}")
                drawn = [with_handles(s) if mix.random() < handles else s for s in drawn]
            items = [encode_sample(core, s, images) for s in drawn]
            items = [it for it in items if len(it["input_ids"]) <= max_len]
            items.sort(key=lambda it: len(it["input_ids"]))
            chunks = [items[i:i + batch] for i in range(0, len(items), batch)]
            random.Random(step).shuffle(chunks)
            pool = chunks
        chunk = pool.pop()
        elapsed = time.time() - t0
        frac = max(step / steps, elapsed / budget if budget else 0.0)
        scale = min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
        for g, base_lr in zip(opt.param_groups, (lr, lr * 3), strict=True):
            g["lr"] = base_lr * scale
        loss, n_tok = answer_loss(model, core.collate(chunk, pad_left=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora + rest, 1.0)
        opt.step()
        history.append({"step": step + 1, "loss": round(float(loss.item()), 4), "t": round(elapsed, 1),
                        "tokens": n_tok})
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr * scale:.1e}")
        done = budget and time.time() - t0 >= budget
        snap = snapshot_every > 0 and (step + 1) % snapshot_every == 0
        if (step + 1) % save_every == 0 or done or step + 1 == steps or snap:
            _checkpoint(core, opt, out, state_path, step + 1, history, time.time() - t0, steps, batch, lr, seed)
        if snap:
            (out / "snapshots").mkdir(exist_ok=True)
            shutil.copyfile(out / "adapter" / "adapter_model.safetensors",
                            out / "snapshots" / f"step-{step + 1:06d}.safetensors")
            if train_vision or align:  # the projector moves too: keep it beside the adapter
                _save_projector(out / "vision.safetensors",
                                out / "snapshots" / f"step-{step + 1:06d}{PROJECTOR_SUFFIX}")
        if done:
            log(f"core: time budget of {minutes} min reached at step {step + 1}")
            break
    if not history or history[-1]["step"] != step + 1 or not (out / "core.json").exists():
        _checkpoint(core, opt, out, state_path, step + 1, history, time.time() - t0, steps, batch, lr, seed)
    return {"steps": history[-1]["step"] if history else start_step,
            "loss": history[-1]["loss"] if history else None, "out": str(out)}


#: training conversations whose plain-text answers make a core's phrases.txt (orchestrator.core.phrases)
PHRASES_SAMPLES = 2000
PHRASES_SEED = 1


def answer_phrases(n: int = PHRASES_SAMPLES, *, seed: int = PHRASES_SEED, registry: Any = None) -> list[str]:
    """The plain-text answers (no call) of ``n`` training conversations (the training split only), as
    drawn, repeats kept: what the core was trained to write, for its answer drafts."""
    from training.core_data import Generator

    gen = Generator(registry, split="train", seed=seed, n_scenes=400)
    return [s.answer for s in gen.generate(n) if s.answer and "<call" not in s.answer]


def answer_loss(model: Any, b: dict[str, Any]) -> tuple[Any, int]:
    """Cross-entropy on the answer tokens only. Batches are left-padded, so every answer ends the
    row: logits are computed for the last K positions only (the 49k-word output layer is a large
    share of a step), with positions counted from the attention mask exactly as ``generate`` does."""
    import torch

    dev = next(p for p in model.parameters()).device
    b = {k: v.to(dev) for k, v in b.items()}
    labels = b.pop("labels")
    mask = b["attention_mask"]
    n_ans = (labels != -100).sum(1)
    k = int(n_ans.max().item()) + 1
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(**b, position_ids=pos, logits_to_keep=k)
    logits = out.logits[:, :-1].float()
    target = labels[:, -k + 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=-100)
    return loss, int(mask.numel())


def _checkpoint(core: Any, opt: Any, out: Path, state_path: Path, step: int, history: list, elapsed: float,
                steps: int, batch: int, lr: float, seed: int) -> None:
    import torch

    recent = [h["loss"] for h in history[-50:]]
    save_parts(core, out, meta={"trained_steps": step, "batch": batch, "lr": lr, "seed": seed,
                                "planned_steps": steps, "elapsed_s": round(elapsed),
                                "loss_last50": round(sum(recent) / max(1, len(recent)), 4)})
    (out / "train_log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    state_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = state_path.with_suffix(".tmp")
    torch.save({"optimizer": opt.state_dict(), "step": step, "history": history, "elapsed": elapsed}, tmp)
    tmp.replace(state_path)


def _save_projector(vision: Path, dest: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_file({k: v for k, v in load_file(str(vision)).items() if k.startswith(_PROJECTOR)}, str(dest))


def _projector_of(src: Path) -> Path | None:
    """The projector that goes with an adapter source: a core directory's vision.safetensors, or the
    ``step-N.projector.safetensors`` a run that trained the projector kept beside ``step-N.safetensors``."""
    f = src / "vision.safetensors" if src.is_dir() else src.with_name(src.name[:-len(".safetensors")]
                                                                         + PROJECTOR_SUFFIX)
    return f if f.is_file() else None


def _mean(tensors: list[Any]) -> Any:
    """Element-wise mean, computed in float32, in the first tensor's dtype."""
    return (sum(t.float() for t in tensors) / len(tensors)).to(tensors[0].dtype).contiguous()


class AverageError(ValueError):
    """Adapters that cannot be averaged (missing, or not the same tensors)."""


def average_cores(sources: list[Path], out: Path) -> dict[str, Any]:
    """Uniform weight average ("model soup") of LoRA adapters that share one layout: runs resumed
    from one another, or the snapshots of one run. A source is a core directory or an adapter
    ``.safetensors`` file; ``out`` gets the first directory's other parts (config, vision tower,
    tokenizer, adapter config) and the averaged adapter, and its core.json lists the sources. The
    projector is averaged too when every source has one (a directory's, or a snapshot's
    ``.projector`` file); otherwise it is the first directory's."""
    from safetensors.torch import load_file, save_file

    files, dirs, projectors = [], [], []
    for src in sources:
        if src.name.endswith(PROJECTOR_SUFFIX):  # a snapshot's projector: taken with its adapter below
            continue
        f = src / "adapter" / "adapter_model.safetensors" if src.is_dir() else src
        if not f.is_file():
            raise AverageError(f"{src}: not a core directory with adapter/adapter_model.safetensors, nor an "
                               "adapter .safetensors file")
        files.append(f)
        projectors.append(_projector_of(src))
        if src.is_dir():
            dirs.append(src)
    if len(files) < 2:
        raise AverageError("--average needs at least two adapters")
    if not dirs:
        raise AverageError("--average needs at least one core directory among its sources (for the other parts)")
    states = [load_file(str(f)) for f in files]
    layout = {k: tuple(v.shape) for k, v in states[0].items()}
    for f, st in zip(files[1:], states[1:], strict=True):
        if {k: tuple(v.shape) for k, v in st.items()} != layout:
            raise AverageError(f"{f} and {files[0]} are not adapters of one layout (other layers, rank or "
                               "targets): only adapters of one lineage can be averaged")
    avg = {k: _mean([st[k] for st in states]) for k in layout}
    first = dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    if first.resolve() != out.resolve():
        for item in first.iterdir():
            if item.name in ("snapshots", "adapter") or item.name.startswith("."):
                continue
            dest = out / item.name
            if item.is_dir():
                shutil.copytree(item, dest, dirs_exist_ok=True)
            else:
                shutil.copyfile(item, dest)
        (out / "adapter").mkdir(exist_ok=True)
        shutil.copyfile(first / "adapter" / "adapter_config.json", out / "adapter" / "adapter_config.json")
    tmp = out / "adapter" / ".adapter_model.tmp"
    save_file(avg, str(tmp))
    tmp.replace(out / "adapter" / "adapter_model.safetensors")
    # the projector: averaged with the adapters when every source has one (a run that trained it),
    # else the first directory's, as the rest of the vision tower always is
    averaged_projector = all(projectors)  # first's own is first / "vision.safetensors" then
    if averaged_projector:
        vision = load_file(str(first / "vision.safetensors"))
        projs = [load_file(str(f)) for f in projectors]
        for k in [k for k in vision if k.startswith(_PROJECTOR)]:
            if any(k not in pr or pr[k].shape != vision[k].shape for pr in projs):
                raise AverageError(f"the projectors of {first} and the other sources differ in layout ({k})")
            vision[k] = _mean([pr[k] for pr in projs])
        tmp = out / ".vision.tmp"
        save_file(vision, str(tmp))
        tmp.replace(out / "vision.safetensors")
    info = json.loads((first / "core.json").read_text())
    info["averaged_from"] = [str(f) for f in files]
    info["projector"] = "averaged" if averaged_projector else f"from {first}"
    (out / "core.json").write_text(json.dumps(info, indent=1) + "\n")
    return {"out": str(out), "averaged": len(files), "tensors": len(layout),
            "projector": info["projector"]}


def main_train(argv: list[str]) -> int:
    """``switchboard train core [--out DIR] [--steps N] [--batch B] [--minutes M] [--resume] [--tiny]``."""
    p = argparse.ArgumentParser(prog="switchboard train core", description="Invocation-tune the core "
                                "(pretraining the shapes-world vision tower first if needed).")
    p.add_argument("--out", type=Path, default=None, help="output directory (default models/core; "
                   "--tiny: .cache/core/tiny)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 1500; --tiny: 4)")
    p.add_argument("--batch", type=int, default=None, help="conversations per step (default 8; --tiny: 2)")
    p.add_argument("--minutes", type=float, default=None, help="stop (annealed) after this many minutes")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--tiny", action="store_true", help="a tiny random LM and vision tower: CI smoke run")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (default 50)")
    p.add_argument("--lr", type=float, default=3e-4, help="LoRA learning rate (projector: 3x)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=384, help="drop longer training conversations")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--vision-only", action="store_true", help="only pretrain the vision tower")
    p.add_argument("--lora-layers", type=int, default=None, help="LoRA on the top N decoder layers (0 = all; "
                   "default: the resumed adapter's layers, else 15 — backpropagation stops there, a cheaper "
                   "CPU step); a resumed adapter's layers are always kept")
    p.add_argument("--train-vision", action="store_true", help="also train the projector (backpropagates "
                   "through every layer: use it on a GPU)")
    p.add_argument("--base", type=Path, default=None, help="fine-tune a full LLaVA-family checkpoint directory "
                   "instead of the embedded SmolLM2 core (a bigger core, on a GPU)")
    p.add_argument("--align", action="store_true", help="train only the projector, on questions about the "
                   "attached image (LLaVA stage 1 on a trained core: the LoRA adapter stays as it is)")
    p.add_argument("--handles", type=float, default=0.0, metavar="SHARE",
                   help="share of training conversations with short handles (img1, mask1 …) instead of "
                   "artifact ids, as the loop shows them (default 0)")
    p.add_argument("--snapshot-every", type=int, default=0, metavar="N",
                   help="also keep the adapter (and, when it trains, the projector) every N steps in "
                   "OUT/snapshots/ (for --average)")
    p.add_argument("--average", type=Path, nargs="+", default=None, metavar="SRC",
                   help="train nothing: write into --out the weight average of these cores' adapters "
                   "(core directories or adapter .safetensors files, e.g. OUT/snapshots/*; the first "
                   "directory gives the other parts; the projectors are averaged too when every source "
                   "has one)")
    p.add_argument("--phrases-only", action="store_true", help="train nothing: write --out's phrases.txt "
                   "(the answers of training conversations, which the core's answers are drafted from) for a "
                   "core trained before it had one")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if a.phrases_only:
        out = a.out or default_out()
        if not (out / "core.json").exists():
            p.error(f"--phrases-only: no core in {out}")
        from orchestrator.core.phrases import write_phrases

        texts = answer_phrases()
        print(json.dumps({"out": str(write_phrases(out, texts)), "answers": len(texts)}))
        return 0
    if a.average:
        if a.out is None:
            p.error("--average needs --out")
        try:
            print(json.dumps(average_cores(a.average, a.out)))
        except AverageError as e:
            p.error(str(e))
        return 0
    if a.vision_only:
        _threads(a.threads)
        print(pretrain_vision(steps=a.steps or 1200, tiny=a.tiny))
        return 0
    out = a.out or (work_dir() / "tiny" if a.tiny else default_out())
    steps = a.steps or (4 if a.tiny else 1500)
    batch = a.batch or (2 if a.tiny else 8)
    if steps < 1 or batch < 1:
        p.error("--steps and --batch must be at least 1")
    if a.lora_layers is not None and a.lora_layers < 0:
        p.error("--lora-layers must be 0 (all) or more")
    if a.snapshot_every < 0:
        p.error("--snapshot-every must be 0 (none) or more")
    if not 0.0 <= a.handles <= 1.0:
        p.error("--handles must be a share between 0 and 1")
    try:
        res = train(out=out, steps=steps, batch=batch, minutes=a.minutes, resume=a.resume, tiny=a.tiny,
                    save_every=a.save_every, seed=a.seed, lr=a.lr, max_len=a.max_len, threads=a.threads,
                    lora_layers=a.lora_layers, train_vision=a.train_vision, base=a.base,
                    snapshot_every=a.snapshot_every, align=a.align, handles=a.handles)
    except AdapterLayersError as e:
        p.error(str(e))
    print(json.dumps(res))
    return 0


# -- evaluation -------------------------------------------------------------------------------------
HUMAN_SET = Path(__file__).resolve().parent / "core_heldout_human.jsonl"
_ARTICLE = re.compile(r"^(the|a|an)\s+")


def _norm_value(v: str) -> str:
    """Compare values loosely where people would: case, articles, spacing, JSON formatting."""
    s = str(v).strip()
    try:
        parsed = json.loads(s)
        if not isinstance(parsed, str):
            return json.dumps(parsed, separators=(",", ":"))
    except (json.JSONDecodeError, ValueError):
        pass
    s = " ".join(s.lower().strip(" .!?,'\"").split())
    return _ARTICLE.sub("", s)


def _norm_calls(calls: list[Any]) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """Calls as (expert, sorted normalised args) with ``$id`` references renamed by position."""
    ids = {(c["id"] if isinstance(c, dict) else c.id): i for i, c in enumerate(calls)}
    out = []
    for c in calls:
        expert, args = (c["expert"], c["args"]) if isinstance(c, dict) else (c.expert, c.args)
        norm = []
        for k, v in args.items():
            v = str(v)
            if v.startswith("$") and v[1:] in ids:
                v = f"$#{ids[v[1:]]}"
            v = _norm_value(v)
            if k == "query":  # detect and segment match a noun singular or plural alike
                v = " ".join(singular(w) for w in v.split())
            norm.append((k, v))
        out.append((expert, tuple(sorted(norm))))
    return out


def routing_metrics(golds: list[list[dict]], preds: list[list[Any]], prefix: str = "") -> dict[str, Any]:
    """expert_accuracy, exact_call_accuracy (all routing samples), argument_f1 (micro, over
    (call index, expert, argument, value)), none_accuracy (samples that need no call)."""
    n = len(golds)
    exp_ok = exact_ok = none_total = none_ok = 0
    tp = fp = fn = 0
    for gold, pred in zip(golds, preds, strict=True):
        g, p = _norm_calls(gold), _norm_calls(pred)
        exp_ok += [e for e, _ in g] == [e for e, _ in p]
        exact_ok += g == p
        if not gold:
            none_total += 1
            none_ok += not pred
        gs = {(i, e, k, v) for i, (e, a) in enumerate(g) for k, v in a}
        ps = {(i, e, k, v) for i, (e, a) in enumerate(p) for k, v in a}
        tp += len(gs & ps)
        fp += len(ps - gs)
        fn += len(gs - ps)
    def ratio(a: int, b: int) -> float | None:  # None, not 0.0, when there was nothing to score
        return round(a / b, 4) if b else None

    return {f"{prefix}expert_accuracy": ratio(exp_ok, n),
            f"{prefix}exact_call_accuracy": ratio(exact_ok, n),
            f"{prefix}argument_f1": ratio(2 * tp, 2 * tp + fp + fn),
            f"{prefix}none_accuracy": ratio(none_ok, none_total),
            f"{prefix}n": n, f"{prefix}n_none": none_total}


_NUM = re.compile(r"\d+(?:\.\d+)?")
_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
_SHAPES = ("circle", "square", "triangle", "hexagon", "star")
_NAMES = _COLOURS + _SHAPES
_GROUP = re.compile(rf"\b({'|'.join(_COLOURS)}) ({'|'.join(_SHAPES)})s?\b")
_BACKGROUND = re.compile(r"\b((?:noisy |textured )?[a-z]+(?: grey)?(?: gradient)? background)\b")


def scene_facts(text: str) -> set[str]:
    """What a description says of the image: each colour shape it names ("red circle", plurals
    alike) and its background phrase ("noisy beige background")."""
    low = text.lower()
    facts = {f"{c} {s}" for c, s in _GROUP.findall(low)}
    return facts | {f"bg: {b.removeprefix('a ').removeprefix('an ')}" for b in _BACKGROUND.findall(low)}


def grounding_metrics(golds: list[str], preds: list[str]) -> dict[str, Any]:
    """How well answers about the attached image (describe it, its background) match the scene:
    micro F1 over ``scene_facts`` and the share of answers that equal the reference exactly (every
    count too). A core whose image tokens are blank scores what guessing a typical scene gives."""
    tp = fp = fn = exact = 0
    for g, p in zip(golds, preds, strict=True):
        gs, ps = scene_facts(g), scene_facts(p)
        tp, fp, fn = tp + len(gs & ps), fp + len(ps - gs), fn + len(gs - ps)
        exact += " ".join(g.lower().split()) == " ".join(p.lower().split())
    n = len(golds)
    return {"grounding_f1": round(2 * tp / (2 * tp + fp + fn), 4) if tp + fp + fn else None,
            "grounding_exact": round(exact / n, 4) if n else None, "n_grounding": n}


def faithful(answer: str, tool_text: str, facts: list[str]) -> bool:
    """An answer is faithful when every number and shape/colour name in it appears in the tool
    results, and it states the facts the results carry (counts, names, failures)."""
    a, t = answer.lower(), tool_text.lower()
    if any(x not in set(_NUM.findall(t)) for x in _NUM.findall(a)):
        return False
    if any(w in a and w not in t for w in _NAMES):
        return False
    for f in facts:
        if f == "fail":
            if not re.search(r"fail|sorry|could not|couldn't|error", a):
                return False
        elif f.lower() not in a:
            return False
    return True


def load_human_set(path: Path = HUMAN_SET) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip() and not line.lstrip().startswith("//"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i + 1}: {e}") from None
    return rows


def human_samples(registry: Any = None) -> list[Any]:
    """The human-phrased held-out requests as Samples (each on a held-out scene), for the experts
    that are registered (or stood in for)."""
    from training.core_data import SPLITS, Sample, data_registry, new_id, scene_seeds

    assert "heldout" in SPLITS
    reg = data_registry(registry)
    rng = random.Random("human")
    seeds = scene_seeds("heldout", 64)
    out = []
    for i, row in enumerate(load_human_set()):
        if any(c["expert"] not in reg for c in row["calls"]):
            continue
        img = new_id("image", rng) if row.get("image", True) else None
        calls = []
        for j, c in enumerate(row["calls"]):
            cls = reg.get_class(c["expert"])
            order = list(cls.Args.model_fields)
            args = {k: (json.dumps(v, separators=(",", ":")) if not isinstance(v, str) else v.replace("{image}", img or ""))
                    for k, v in sorted(c["args"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99)}
            calls.append({"id": f"c{j + 1}", "expert": c["expert"], "args": args})
        msg: dict[str, Any] = {"role": "user", "content": row["request"]}
        if img:
            msg["images"] = [img]
        out.append(Sample("human", [msg], "", {img: seeds[i % len(seeds)]} if img else {}, calls,
                          source=f"human:{i}", split="heldout"))
    return out


def _artifacts_of(msgs: list[dict]) -> dict[str, str]:
    """The artifact ids a conversation mentions, with their kinds."""
    from orchestrator.core.format import render
    from switchboard.artifacts import ID_PATTERN

    arts: dict[str, str] = {}
    for tok in re.findall(r"[a-z]+-[0-9a-f]{24}", render(msgs)):
        m = ID_PATTERN.match(tok)
        if m:
            arts[tok] = m.group("kind")
    return arts


def _grammar_for(registry: Any, artifacts: dict[str, str], **kw: Any) -> list[Any]:
    """A grammar processor allowing ``artifacts`` (the names the core reads, ids or handles -> kind; one
    per batch); ``kw`` go to the grammar (``route``, ``allow_calls``)."""
    from orchestrator.core.grammar import CommandGrammar, GrammarLogitsProcessor

    return [GrammarLogitsProcessor(CommandGrammar.from_registry(registry, artifacts, **kw), _GRAMMAR_TOKENIZER[0])]


_GRAMMAR_TOKENIZER: list[Any] = []


def _as_core_reads(messages: list[dict], images: dict[str, Any], handles: bool) -> tuple[list[dict], dict, dict, Any]:
    """A conversation as the loop shows it to the core: with short handles (``img1``, ``mask1`` …,
    ``orchestrator.core.handles``) where ``handles``, else with its artifact ids. Returns the messages,
    images and artifacts (name -> kind) the core reads, and the ``Handles`` that map a reply back to
    ids (None without handles)."""
    from orchestrator.core.handles import Handles

    arts = _artifacts_of(messages)
    if not handles:
        return messages, images, arts, None
    h = Handles.for_conversation(messages, arts)
    return h.messages(messages), h.images(images), h.artifacts(arts), h


def _uses_handles(core: Any, handles: bool | None) -> bool:
    """Whether the loop would show ``core`` short handles (``core.short_handles``), unless ``handles`` says;
    never for a remote core (its grammar and prompt name artifacts by id)."""
    if getattr(core, "remote", False):
        return False
    return bool(getattr(core, "short_handles", False)) if handles is None else handles


def evaluate(core: Any, *, n: int = 200, seed: int = 0, batch: int = 8, human: bool = True,
             max_new_tokens: int = 120, grammar: bool = False, kind: str | None = None,
             log: Any = print, jump_forward: bool = True, router: Any = None,
             handles: bool | None = None) -> dict[str, Any]:
    """Held-out metrics (see the module doc and MODEL_CARD.md). Greedy decoding; ``router`` routes each
    sample the loop would route (a first turn, or a message that brings an image) and constrains its
    decoding to the routed calls, as ``switchboard chat`` does; ``grammar`` applies
    the command grammar (orchestrator/core/grammar.py) with the artifacts of each batch's
    conversations, as ``switchboard chat`` does with one conversation's; with the grammar and
    ``jump_forward`` (a core with ``decode``), each conversation is decoded as the loop decodes it:
    jump-forward over the canonical grammar, one conversation at a time. ``handles``: the core reads
    and writes short handles instead of artifact ids (None: as the loop shows them to this core,
    ``core.short_handles``, True for the embedded core); replies are mapped back to ids before scoring."""
    from tqdm import tqdm

    from orchestrator.commands import parse
    from orchestrator.core.loop import TOKENS_PER_CALL
    from training.core_data import Generator, data_registry

    handles = _uses_handles(core, handles)

    registry = data_registry()
    _GRAMMAR_TOKENIZER[:] = [getattr(core, "tokenizer", None)]  # a remote core has none (and needs none)
    trained = core.info.get("experts")
    if trained and sorted(trained) != registry.names():
        log(f"core eval: the registry changed since training (trained with {', '.join(sorted(trained))}; now "
            f"{', '.join(registry.names())}); retrain to teach the core the new experts' examples",
            file=sys.stderr)

    gen = Generator(split="heldout", seed=10_000 + seed, n_scenes=min(400, max(16, n)))
    samples = gen.generate(n, kind)
    if human:
        samples += human_samples()
    images = _Images()
    preds: list[str] = []
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].messages) * 1000
                   + sum(len(m["content"]) for m in samples[i].messages))
    out_text: dict[int, str] = {}
    routes = _heldout_routes(samples, router, registry) if router is not None else {}
    seen = {}  # sample -> the conversation as the core reads it (messages, images, artifacts, handles)
    for i, sample in enumerate(samples):
        seen[i] = _as_core_reads(sample.messages, {aid: images(s) for aid, s in sample.images.items()}, handles)
    for i, route in routes.items():  # a routed sample is decoded alone, under its route's grammar
        m, im, arts, h = seen[i]
        kw: dict[str, Any] = {"route": route} if route else {"allow_calls": False}
        budget = max(max_new_tokens, TOKENS_PER_CALL * len(route)) if route else max_new_tokens
        if getattr(core, "remote", False):
            text = _remote_decode(core, m, registry, images=im, max_new_tokens=budget, **kw)
        elif jump_forward and hasattr(core, "decode"):
            text = core.decode(m, im, grammar=_grammar_for(registry, arts, canonical=True, **kw)[0].grammar,
                               max_new_tokens=budget).text
        else:
            text = core.generate_batch([(m, im)], max_new_tokens=budget,
                                       logits_processor=_grammar_for(registry, arts, **kw))[0]
        out_text[i] = h.ids(text) if h is not None else text
    order = [i for i in order if i not in routes]
    for k in tqdm(range(0, len(order), batch), desc="eval core", unit="batch"):
        idx = order[k:k + batch]
        convs = [seen[i][:2] for i in idx]
        arts = {name: kind for i in idx for name, kind in seen[i][2].items()}
        remote = getattr(core, "remote", False)
        procs = _grammar_for(registry, arts) if grammar and not remote else None
        if remote:  # one request per conversation, constrained (and repaired) as the loop's are
            texts = [_remote_decode(core, m, registry, images=im, max_new_tokens=max_new_tokens, constrain=grammar)
                     for m, im in convs]
        elif procs and jump_forward and hasattr(core, "decode"):
            texts = [core.decode(m, im, grammar=_grammar_for(registry, seen[i][2], canonical=True)[0].grammar,
                                 max_new_tokens=max_new_tokens).text for i, (m, im) in zip(idx, convs, strict=True)]
        else:
            texts = core.generate_batch(convs, max_new_tokens=max_new_tokens, logits_processor=procs)
        for i, text in zip(idx, texts, strict=True):
            out_text[i] = seen[i][3].ids(text) if seen[i][3] is not None else text
    preds = [out_text[i] for i in range(len(samples))]
    route = [(s, p) for s, p in zip(samples, preds, strict=True) if s.kind not in ("fusion", "human")]
    hum = [(s, p) for s, p in zip(samples, preds, strict=True) if s.kind == "human"]
    fus = [(s, p) for s, p in zip(samples, preds, strict=True) if s.kind == "fusion"]
    res: dict[str, Any] = {"routed": len(routes)} if router is not None else {}
    res.update(routing_metrics([s.calls for s, _ in route], [parse(p).calls for _, p in route]))
    ok = [faithful(p, s.messages[-1]["content"], s.facts) and not parse(p).calls for s, p in fus]
    res["fusion_faithfulness"] = round(sum(ok) / len(ok), 4) if ok else None
    res["n_fusion"] = len(ok)
    desc = [(s, p) for s, p in zip(samples, preds, strict=True) if s.source == "describe"]
    res.update(grounding_metrics([s.answer for s, _ in desc], [p for _, p in desc]))
    if hum:
        res.update(routing_metrics([s.calls for s, _ in hum], [parse(p).calls for _, p in hum], prefix="human_"))
    res["errors"] = [{"kind": s.kind, "source": s.source, "request": s.messages[-1]["content"][:200],
                      "expected": s.answer if s.kind != "human" else "\n".join(
                          f'{c["expert"]} {c["args"]}' for c in s.calls) or "(no call)", "got": p}
                     for s, p in zip(samples, preds, strict=True)
                     if (s.kind == "fusion" and not faithful(p, s.messages[-1]["content"], s.facts))
                     or (s.kind != "fusion" and _norm_calls(s.calls) != _norm_calls(parse(p).calls))
                     or (s.source == "describe" and scene_facts(p) != scene_facts(s.answer))]
    return res


def _heldout_routes(samples: list[Any], router: Any, registry: Any) -> dict[int, tuple[str, ...]]:
    """The routes the loop would impose (``Assistant._route``): on a first turn or a message that
    brings an image, when the conversation can serve the route; fusion turns are never routed."""
    from orchestrator.core.grammar import CommandGrammar

    asked: list[int] = []
    for i, s in enumerate(samples):
        last = s.messages[-1]
        if last["role"] != "user":
            continue
        if any(m["role"] == "assistant" for m in s.messages[:-1]) and not last.get("images"):
            continue
        asked.append(i)
    arts = [_artifacts_of(samples[i].messages) for i in asked]
    found = router.route_batch([samples[i].messages[-1]["content"] for i in asked],
                               [any(k == "image" for k in a.values()) for a in arts], registry)
    out: dict[int, tuple[str, ...]] = {}
    for i, a, r in zip(asked, arts, found, strict=True):
        route = tuple(r.experts)
        if not route or CommandGrammar.from_registry(registry, a, route=route).serves_route():
            out[i] = route
    return out


def _remote_decode(core: Any, messages: list[dict], registry: Any, *, images: dict, max_new_tokens: int,
                   constrain: bool = True, **kw: Any) -> str:
    """A remote core's reply (orchestrator/core/remote.py) as the loop gets it: under the conversation's
    command grammar (``kw``: ``route``, ``allow_calls``) where ``constrain`` and the server can, and
    repaired once when it does not validate."""
    from orchestrator.core.grammar import CommandGrammar

    g = CommandGrammar.from_registry(registry, _artifacts_of(messages), canonical=True, **kw)
    return core.decode(messages, images, grammar=g, max_new_tokens=max_new_tokens, constrain=constrain).text


#: the tokens a reply gets when its grammar admits no call (``allow_calls=False``): its expert sequence is
#: empty whatever it says, and the wild scorer reads nothing else, so a longer answer would cost time
#: (most of a remote wild run) without changing a figure
NO_CALL_BUDGET = 8


def evaluate_wild(core: Any, *, batch: int = 8, grammar: bool = False, max_new_tokens: int = 120,
                  limit: int | None = None, router: Any = None, items: list[Any] | None = None,
                  handles: bool | None = None) -> dict[str, Any]:
    """The core on the wild set (training/evalsets/wild.jsonl, see training/wild.py): each request
    with its image attached; the parsed calls' expert sequence is scored. Aggregates only.
    ``items``: another set of ``WildItem``s scored the same way (the dev set, ``_dev_items``;
    its attached images, ``"attached"``, are the wild set's shapes-world ``scene``).

    With ``router`` (as ``switchboard chat`` runs it), each request is routed first and the grammar
    lets the core write exactly the routed calls (or only a plain answer), as the loop does; a route
    the request cannot serve (an expert that needs an image when none is attached) is not imposed.
    A reply routed to no call is decoded for ``NO_CALL_BUDGET`` tokens where the grammar is enforced
    (the embedded core's, a remote core's unless ``SWITCHBOARD_CORE_GRAMMAR=none``): its grammar admits
    no ``<``, so its expert sequence is empty at any length. ``handles`` as for ``evaluate`` (the attached
    image is ``img1`` to the embedded core, as in the loop).
    """
    from tqdm import tqdm

    from orchestrator.commands import parse
    from orchestrator.core.grammar import CommandGrammar
    from orchestrator.core.loop import TOKENS_PER_CALL
    from training.core_data import data_registry
    from training.wild import calls_to_sequence, load, resolve_image, score

    registry = data_registry()
    _GRAMMAR_TOKENIZER[:] = [getattr(core, "tokenizer", None)]  # a remote core has none (and needs none)
    label = "eval core (wild)" if items is None else "eval core"
    items = list(load() if items is None else items)
    items = items[:limit] if limit else items
    convs: list[tuple[list[dict], dict]] = []
    for i, it in enumerate(items):
        msg: dict[str, Any] = {"role": "user", "content": it.request}
        images = {}
        if it.image:
            aid = f"image-{i:024x}"
            msg["images"] = [aid]
            images[aid] = resolve_image("scene" if it.image == "attached" else it.image)
        convs.append(([msg], images))
    if _uses_handles(core, handles):
        convs = [_as_core_reads(m, im, True)[:2] for m, im in convs]
    routes: list[tuple[str, ...] | None] = [None] * len(items)
    if router is not None:
        found = router.route_batch([it.request for it in items], [bool(it.image) for it in items], registry)
        for i, r in enumerate(found):
            arts = {a: "image" for a in convs[i][1]}
            ok = CommandGrammar.from_registry(registry, arts, route=tuple(r.experts)).serves_route()
            routes[i] = tuple(r.experts) if ok else None
    # one route per batch (the grammar is shared by a batch's rows), shortest requests together
    order = sorted(range(len(items)), key=lambda i: (str(routes[i]), len(items[i].request)))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch and routes[batches[-1][0]] == routes[i]:
            batches[-1].append(i)
        else:
            batches.append([i])
    preds: dict[int, list[str]] = {}
    t0 = time.time()
    for idx in tqdm(batches, desc=label, unit="batch"):
        group = [convs[i] for i in idx]
        route = routes[idx[0]]
        if route is not None:
            kw = {"route": route} if route else {"allow_calls": False}
        else:
            kw = {}
        budget = max(max_new_tokens, TOKENS_PER_CALL * len(route)) if route else max_new_tokens
        if route == () and getattr(core, "grammar_mode", "gbnf") != "none":
            budget = min(budget, NO_CALL_BUDGET)
        if getattr(core, "remote", False):
            texts = [_remote_decode(core, m, registry, images=im, max_new_tokens=budget,
                                    constrain=grammar or route is not None, **kw) for m, im in group]
        else:
            arts = {a: "image" for _, im in group for a in im}  # the attached images, by the names the core reads
            procs = _grammar_for(registry, arts, **kw) if route is not None or grammar else None
            texts = core.generate_batch(group, max_new_tokens=budget, logits_processor=procs)
        for i, text in zip(idx, texts, strict=True):
            preds[i] = calls_to_sequence(parse(text).calls)
    res = score([preds[i] for i in range(len(items))], items)
    res["routed"] = sum(r is not None for r in routes)
    res["seconds"] = round(time.time() - t0, 1)
    res["seconds_per_request"] = round(res["seconds"] / len(items), 2) if items else None
    return res


def _remote_core(spec: str) -> Any:
    """A remote core for ``--core openai:<base_url>#<model>``, set up as ``SWITCHBOARD_CORE`` would be (its
    system prompt from the registry the evaluation uses)."""
    from orchestrator.core.remote import RemoteCore
    from switchboard.settings import get_settings
    from training.core_data import data_registry

    s = get_settings().model_copy(update={"core": spec})
    return RemoteCore.from_settings(s, data_registry())


def _flat(res: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A result's scalar figures, nested ones (``per_expert``) as ``per_expert.detect``."""
    out: dict[str, Any] = {}
    for k, v in res.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif v is None or isinstance(v, int | float | str):
            out[f"{prefix}{k}"] = v
    return out


#: the figures ``side_by_side`` shows first (the rest follow in the order the results have them)
SIDE_BY_SIDE_FIRST = ("expert_accuracy", "exact_call_accuracy", "argument_f1", "none_accuracy", "chain_accuracy")


def side_by_side(results: dict[str, dict[str, Any]]) -> str:
    """One table: a row per figure, a column per core (``results``: core name -> its metrics); a figure
    one core lacks shows ``-``. Counts and timings are rows too, so a reader sees both ran the same set."""
    flat = {name: _flat(r) for name, r in results.items()}
    keys: list[str] = [k for k in SIDE_BY_SIDE_FIRST if any(k in f for f in flat.values())]
    per_expert = any(k.startswith("per_expert.") for f in flat.values() for k in f)
    for f in flat.values():  # per_category repeats per_expert, chain and none: shown once
        keys += [k for k in f if k not in keys and not k.startswith(("counts.", "per_category." if per_expert else "-"))]
    names = list(results)

    def cell(v: Any) -> str:
        return "-" if v is None else str(round(v, 4)) if isinstance(v, float) else str(v)

    rows = [["", *names]] + [[k, *(cell(flat[n].get(k)) for n in names)] for k in keys]
    widths = [max(len(r[i]) for r in rows) + 2 for i in range(len(rows[0]))]
    return "\n".join(r[0].ljust(widths[0]) + "".join(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))
                     for r in rows)


def main_eval(argv: list[str]) -> int:
    """``switchboard eval core [--json] [--n N] [--model PATH] [--set {heldout,wild,dev}] [--core openai:…
    [--compare embedded]]``: held-out templates + human phrasings, the wild set
    (training/evalsets/wild.jsonl) or the dev set; a remote core, beside the embedded one with ``--compare``."""
    p = argparse.ArgumentParser(prog="switchboard eval core", description="Evaluate the core on held-out "
                                "templates and phrasings never used in training, and on human-phrased requests.")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--set", dest="eval_set", choices=["heldout", "wild", "dev"], default="heldout",
                   help="heldout (default): held-out templates + human phrasings; wild: requests written by "
                   "others (training/evalsets/wild.jsonl), expert sequences scored by training/wild.py; dev: the "
                   "tuning set (training/evalsets/dev.jsonl) scored the same way")
    p.add_argument("--limit", type=int, default=None, help="with --set wild|dev: only the first N requests")
    p.add_argument("--router", action=argparse.BooleanOptionalAction, default=True,
                   help="route each request the loop would route first and constrain its decoding to the route, "
                   "as `switchboard chat` does (default on; --no-router: the core plans alone)")
    p.add_argument("--router-model", type=Path, default=None, help="router directory (default: models/router)")
    p.add_argument("--n", type=int, default=200, help="held-out template samples (default 200)")
    p.add_argument("--model", type=Path, default=None, help="core directory (default: the shipped core)")
    p.add_argument("--core", default=None, metavar="openai:<base_url>#<model>",
                   help="evaluate a remote core: any OpenAI-compatible chat endpoint, as SWITCHBOARD_CORE runs it "
                   "(SWITCHBOARD_CORE_GRAMMAR, _CORE_IMAGES, _CORE_API_KEY apply; --grammar constrains every "
                   "reply, routed replies always are)")
    p.add_argument("--compare", choices=["embedded"], default=None,
                   help="with --core: evaluate the embedded core (--model, default the shipped one) on the same set, "
                   "draw, router and flags, and print both in one table (--json: both results)")
    p.add_argument("--no-human", action="store_true", help="skip the human-phrased set")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--errors", type=Path, default=None, help="write the failures to this JSON file")
    p.add_argument("--grammar", action="store_true", help="constrain decoding with the command grammar")
    p.add_argument("--handles", action=argparse.BooleanOptionalAction, default=None,
                   help="the core reads and writes short handles (img1, mask1 …) instead of artifact ids "
                   "(default: as the loop shows them to it, which the embedded core is; a remote core is not)")
    p.add_argument("--jump-forward", action=argparse.BooleanOptionalAction, default=True,
                   help="with --grammar: decode as the loop does, with jump-forward over the canonical grammar "
                   "(default on; off: transformers' generate, batched)")
    p.add_argument("--max-new-tokens", type=int, default=120)
    p.add_argument("--kind", choices=["call", "chain", "none", "followup", "fusion", "describe"], default=None,
                   help="only held-out samples of this kind (default: the training mix; describe: the "
                   "no-expert questions about the attached image that grounding is measured on)")
    p.add_argument("--seed", type=int, default=0, help="which held-out draw (default 0, the one MODEL_CARD.md "
                   "quotes; another seed draws other scenes and phrasings from the same held-out templates)")
    a = p.parse_args(argv)
    if a.compare and not a.core:
        p.error("--compare embedded compares a remote core (--core openai:<base_url>#<model>) with the embedded one")
    if a.compare and a.errors:
        p.error("--errors writes one core's failures: leave out --compare")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    _threads(a.threads)
    from orchestrator.core.model import CoreModel

    router = None
    if a.router:
        from orchestrator.core.router import Router

        router = Router.load(a.router_model)
    cores: dict[str, Any] = {}
    if a.core:
        cores["remote"] = _remote_core(a.core)
    if a.compare or not a.core:
        cores["embedded"] = CoreModel.load(a.model)
    results = {name: _eval_one(core, a, router) for name, core in cores.items()}
    if len(results) == 1:
        res = next(iter(results.values()))
        errors = res.pop("errors", None)
        if a.errors and errors is not None:
            a.errors.write_text(json.dumps(errors, indent=1))
        if a.json:
            print(json.dumps(res))
        else:
            print("\n".join(f"{k:28s} {v}" for k, v in res.items()))
            if errors is not None:
                print(f"({len(errors)} failures{'; see ' + str(a.errors) if a.errors else ''})")
        return 0
    for res in results.values():
        res.pop("errors", None)
    if a.json:
        print(json.dumps({"set": a.eval_set, **results}))
    else:
        print(f"switchboard eval core --set {a.eval_set}: {a.core} beside the embedded core")
        print(side_by_side(results))
    return 0


DEV_SET = Path(__file__).resolve().parent / "evalsets" / "dev.jsonl"


def _dev_items(path: Path = DEV_SET) -> list[Any]:
    """The dev (tuning) set as ``WildItem``s, as ``training.router.load_dev`` reads it (an attached image is
    ``"attached"``; evaluate_wild shows the shapes-world scene). Read here: training.router imports this
    module, so importing it back would be a cycle."""
    from training.wild import WildItem

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [WildItem(r["id"], r["request"], "attached" if r.get("image") else None, tuple(r["expected"]),
                     category=r.get("category", "")) for r in rows]


def _eval_one(core: Any, a: argparse.Namespace, router: Any) -> dict[str, Any]:
    """One core's figures for ``main_eval``'s arguments (the set, router, flags), labelled with how it ran."""
    remote = getattr(core, "remote", False)
    if a.eval_set in ("wild", "dev"):
        items = None
        if a.eval_set == "dev":
            items = _dev_items()
        res = evaluate_wild(core, batch=a.batch, grammar=a.grammar, max_new_tokens=a.max_new_tokens,
                            router=router, items=items, limit=a.limit, handles=a.handles)
        res["router"] = str(a.router_model or "models/router") if router is not None else None
        res["decoding"] = "grammar" if a.grammar else "unconstrained"
    else:
        res = evaluate(core, n=a.n, batch=a.batch, human=not a.no_human, grammar=a.grammar,
                       max_new_tokens=a.max_new_tokens, kind=a.kind, seed=a.seed, jump_forward=a.jump_forward,
                       router=router, handles=a.handles)
        res["router"] = str(a.router_model or "models/router") if router is not None else None
        res["decoding"] = ("grammar, jump-forward" if a.jump_forward else "grammar") if a.grammar else "unconstrained"
        if remote:
            res["decoding"] = "grammar" if a.grammar else "unconstrained"
    res["handles"] = _uses_handles(core, a.handles)  # what the core read: img1 … or artifact ids
    if remote:  # how the server was asked to constrain (routed replies always are), repaired once
        res.update(core=a.core, core_grammar=core.grammar_mode)
    return res
