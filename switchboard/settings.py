"""One place for configuration: environment variables prefixed ``SWITCHBOARD_`` and an optional ``.env``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Runtime settings. Every field can be set as ``SWITCHBOARD_<FIELD>`` (e.g. ``SWITCHBOARD_BROKER_URL``)."""

    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_", env_file=".env", extra="ignore")

    # Storage
    artifact_dir: Path = Field(default=REPO_ROOT / "var" / "artifacts", description="Artifact store root.")
    cache_dir: Path = Field(default=REPO_ROOT / ".cache", description="Converted weights, datasets, configs.")
    models_dir: Path = Field(default=REPO_ROOT / "models", description="Shipped checkpoints.")
    conversations_dir: Path | None = Field(
        default=None, description="Where conversations are kept (one JSON file each); default: a "
        "'conversations' folder beside the artifact store (var/conversations).")
    retention_days: float | None = Field(
        default=None, ge=0, description="`switchboard gc` removes conversations not updated for this many days, "
        "and the artifacts no remaining conversation references; unset = keep everything.")
    import_max_side: int | None = Field(
        default=2048, ge=64, description="An uploaded image larger than this on its longest side is downscaled "
        "once at import to this size (what the core and the experts read); the original is kept as its own "
        "artifact, named in the metadata (extra.original). Unset = store uploads as they are.")

    # Limits
    max_image_bytes: int = Field(default=20 * 1024 * 1024, description="Largest accepted encoded image.")
    max_image_pixels: int = Field(default=40_000_000, description="Largest accepted width*height.")
    call_timeout_s: float = Field(default=120.0, description="Default time limit of one expert call.")
    max_images_per_request: int = Field(
        default=16, ge=1, description="Images one chat request may carry, over all its messages (400 beyond).")
    max_calls_per_reply: int = Field(default=16, description="Calls beyond this in one reply are refused.")
    max_parallel_calls: int = Field(default=4, description="In-process dispatcher worker threads.")

    # Model paths ("real weights, same code")
    detect_weights: Path | None = None
    segment_weights: Path | None = None
    segment_model_type: str | None = None
    segment_cache_size: int = Field(default=16, ge=0, description="Image embeddings the segment expert keeps (LRU).")
    generate_model: Path | None = None
    core_model: Path | None = None
    router_model: Path | None = Field(
        default=None, description="The intent router (MiniLM + a small head) that picks the experts of a new "
        "request before the core writes the calls; default: models/router.")
    use_router: bool = Field(default=True, description="Route new requests with the router (off: the core "
                             "alone decides which experts to call).")
    core_prefix_cache: bool = Field(
        default=True, description="The fusion pass reuses the plan pass's KV cache for their shared prompt prefix "
        "(off: it prefills its whole prompt again; replies are the same either way).")
    core_jump_forward: bool = Field(
        default=True, description="Jump-forward decoding: what the command grammar leaves no choice about (a "
        "tag's syntax, a routed expert's name, the only image's id) is appended without a forward pass (off: "
        "one pass per token through transformers' generate).")
    core: str | None = Field(
        default=None, description="A remote core: openai:<base_url>#<model> plans and answers through any "
        "OpenAI-compatible chat endpoint (vLLM, Ollama, llama.cpp; orchestrator/core/remote.py); unset = the "
        "embedded core (or SWITCHBOARD_CORE_MODEL).")
    core_api_key: str | None = Field(default=None, description="Bearer key for the remote core's endpoint.")
    core_grammar: Literal["gbnf", "vllm", "guided_grammar", "none"] = Field(
        default="gbnf", description="How the remote core's server is asked to keep replies in the command "
        "grammar: gbnf (body field 'grammar': llama.cpp), vllm (structured_outputs.grammar), guided_grammar "
        "(older vLLM), none (OpenAI, Ollama: replies are validated, and repaired once, only).")
    core_images: bool = Field(
        default=True, description="Send attached images to the remote core as data URIs (off: a text-only "
        "model gets only their artifact ids, and its plain answers about them are not trusted).")
    core_timeout_s: float = Field(default=120.0, gt=0, description="Time limit of one remote core request.")
    core_max_prompt_tokens: int | None = Field(
        default=2048, ge=64, description="The core's prompt limit in tokens: older turns are left out first; a "
        "message that alone is longer is refused (400 context_length_exceeded). Unset = no limit.")

    # Distributed dispatch. The broker URL has one meaning: unset = every call runs in the orchestrator's
    # process; set = every call goes through Celery. A worker without it refuses to start.
    broker_url: str | None = Field(
        default=None, description="Celery broker (Redis) URL; unset = in-process dispatch (workers need it set).")
    result_backend: str | None = Field(default=None, description="Redis for results; default: the broker URL.")
    worker_max_deliveries: int = Field(
        default=3, ge=1, description="A call whose worker dies this many times is dead-lettered.")
    broker_visibility_timeout_s: float | None = Field(
        default=None, gt=0, description="Safety net: seconds before a call held by a worker is redelivered "
        "whatever its liveness says; default: the longest hard time limit of any expert + 60 s. Must exceed "
        "every call's run time (dead workers are found sooner by their heartbeats).")
    queue_timeout_s: float = Field(
        default=60.0, gt=0, description="How long a call may wait in its queue for a worker before the "
        "orchestrator gives up on it (\"queued N s in queue 'q', M call(s) waiting there; no worker free …\"); "
        "separate from the time it may run, which is its expert's time limit.")
    broker_timeout_s: float = Field(
        default=3.0, gt=0, description="How long the orchestrator waits for the broker (submit, give up on a "
        "call, read queue depths) before reporting that it cannot be reached.")
    worker_liveness_timeout_s: float = Field(
        default=4.0, ge=1, description="A worker whose heartbeat (every second) is missing this long is "
        "dead: another worker puts the calls it held back at the front of their queues.")
    extra_experts: str = Field(
        default="", description="Comma-separated module:Class experts to register besides the entry points "
        "(development and tests; plugins use the switchboard.experts entry-point group).")

    # Worker batching and memory (workers.batching, switchboard.memory)
    batch_max_size: int = Field(
        default=1, ge=1, le=256, description="Calls of one expert a worker runs through run_batch at once; "
        "1 = no batching. `switchboard worker --batch-max N` sets it and uses a threads pool.")
    batch_window_ms: float = Field(
        default=5.0, ge=0, le=1000, description="How long a worker waits for more calls of the same expert "
        "after the first one arrives before running the batch (ms).")
    expert_memory_budget_mb: float | None = Field(
        default=None, gt=0, description="Cap on the memory of the expert models loaded in one process (MiB); "
        "the least recently used are unloaded (offloaded to the CPU when on a GPU). Unset = no cap.")

    # API
    api_keys: list[str] = Field(default_factory=list, description="Accepted Bearer keys; empty = open.")
    max_body_bytes: int = 32 * 1024 * 1024
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins whose pages may call the API from a browser (CORS), as a "
        "comma-separated list (https://app.example.com,http://localhost:3000); empty = none.")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [o.strip().rstrip("/") for o in value.split(",") if o.strip()]
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached; tests clear the cache with ``get_settings.cache_clear()``)."""
    return Settings()
