"""All configuration in one place: CLI flags override ``PERSONA_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_VECTORS = Path(__file__).resolve().parents[1] / "vectors"


class Settings(BaseSettings):
    """Server settings; each field reads ``PERSONA_<FIELD>`` from the environment.

    Example::

        PERSONA_PORT=9000 PERSONA_DATA_DIR=/var/lib/persona persona-server serve
    """

    model_config = SettingsConfigDict(env_prefix="PERSONA_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    model: str = "default"
    served_model_name: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    data_dir: Path = Path("data")
    cache_dir: Path = Path.home() / ".cache" / "persona-server"
    shipped_vectors_dir: Path = REPO_VECTORS
    log_level: str = "info"

    max_batch_size: int = Field(32, ge=1)
    max_waiting: int = Field(256, ge=0)
    # Tokens one engine step processes: every decoding row's next token plus prompt chunks.
    max_num_batched_tokens: int = Field(512, ge=16)
    # Longest prompt + answer per request; None: the model's context, as far as the KV budget allows.
    max_model_len: int | None = Field(None, ge=16)
    kv_cache_gib: float = Field(4.0, gt=0)
    request_timeout_s: float | None = Field(600.0, gt=0)
    default_max_tokens: int = Field(512, ge=1)
    max_tokens_limit: int = Field(4096, ge=1)
    max_steering_entries: int = Field(16, ge=1)
    max_abs_coefficient: float = Field(100.0, gt=0)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_prompt_tokens: int | None = Field(None, ge=1)
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_screen_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    max_assess_prompts: int = Field(50_000, ge=1)
    retry_after_s: int = Field(1, ge=1)
    drain_timeout_s: float = Field(30.0, ge=0)
    drain_notice_s: float = Field(0.0, ge=0)
    log_prompts: bool = False
    cors_origins: Annotated[list[str], NoDecode] = []

    # Comma-separated in the environment: PERSONA_API_KEYS=k1,k2
    api_keys: Annotated[list[str], NoDecode] = []
    admin_keys: Annotated[list[str], NoDecode] = []

    @field_validator("api_keys", "admin_keys", "cors_origins", mode="before")
    @classmethod
    def _split(cls, value):
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value
