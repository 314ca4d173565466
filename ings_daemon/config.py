"""Settings: environment variables and `.env`, validated once at start.

Field names are the environment names lower-cased, so `settings.kafka_bootstrap_servers`
is `KAFKA_BOOTSTRAP_SERVERS` and nothing maps one to the other in a second place.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, FilePath, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .contract.serving import VLLM_LORA_RANKS

Role = Literal["all", "ingest", "trainer", "serving"]


@dataclass(frozen=True)
class Topics:
    """Topic names; a prefix lets several deployments (or tests) share one cluster."""

    handshake: str
    interaction: str
    tune_request: str
    recall_request: str
    forget: str
    persona: str
    recall_result: str
    train_job: str
    tune_status: str
    adapter_ready: str
    forget_result: str
    adapter_retired: str
    served_model: str
    feedback: str
    feedback_result: str
    dlq: str

    @classmethod
    def with_prefix(cls, prefix: str) -> Topics:
        names = {
            "handshake": "ings.handshake",
            "interaction": "ings.interaction",
            "tune_request": "ings.tune-request",
            "recall_request": "ings.recall-request",
            "forget": "ings.forget",
            "persona": "ings.persona",
            "recall_result": "ings.recall-result",
            "train_job": "ings.train-job",
            "tune_status": "ings.tune-status",
            "adapter_ready": "ings.adapter-ready",
            "forget_result": "ings.forget-result",
            "adapter_retired": "ings.adapter-retired",
            "served_model": "ings.served-model",
            "feedback": "ings.feedback",
            "feedback_result": "ings.feedback-result",
            "dlq": "ings.dlq",
        }
        return cls(**{field: prefix + name for field, name in names.items()})

    def all(self) -> list[str]:
        return list(self.__dict__.values())


class Settings(BaseSettings):
    # hide_input_in_errors: a rejected CHROMADB_AUTH_TOKEN must not come back in the error.
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False, hide_input_in_errors=True
    )

    # Kafka
    kafka_bootstrap_servers: str = "localhost:9092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    kafka_ssl_check_hostname: bool = True
    kafka_group_id: str = "ings-daemon"
    kafka_trainer_group_id: str = "ings-trainer"
    kafka_serving_group_id: str = "ings-serving"
    # Static membership: a restarted pod with the same id rejoins without a rebalance.
    kafka_group_instance_id: str | None = None
    kafka_topic_partitions: int = Field(6, ge=1, le=1000)
    kafka_topic_replication: int = Field(1, ge=1, le=10)
    kafka_create_topics: bool = True
    # Larger fetches put more of each persona's records in one Chroma write: 1,024 ingested
    # 5-8% faster than 256 here (bench/ingest_bench.py).
    kafka_max_poll_records: int = Field(1024, ge=1, le=10_000)
    # Tansu completes a group join after half the session timeout, so keep it modest.
    kafka_session_timeout_ms: int = Field(10_000, ge=1_000)
    kafka_max_poll_interval_ms: int = Field(300_000, ge=10_000)
    # Kafka's own message.max.bytes default (1 MiB): nothing the daemon publishes is larger.
    kafka_max_message_bytes: int = Field(1_048_576, ge=65_536, le=100 * 1_048_576)
    ings_topic_prefix: str = Field("", pattern=r"^[A-Za-z0-9._-]{0,64}$")

    # Chroma
    chromadb_host: str | None = None
    chromadb_port: int = Field(8001, ge=1, le=65535)
    chromadb_ssl: bool = False
    # A PEM bundle of the CAs to trust for CHROMADB_SSL (a private CA); unset: the system's.
    chromadb_ssl_ca_file: FilePath | None = None
    # A Chroma server's static token (Chroma's TokenAuthenticationServerProvider, hosted
    # Chroma), sent as CHROMADB_AUTH_HEADER: `Authorization: Bearer <token>` by default.
    chromadb_auth_token: SecretStr | None = None
    chromadb_auth_header: Literal["Authorization", "X-Chroma-Token"] = "Authorization"
    # Chroma's tenant and database (a shared or hosted server); the database is created
    # when missing and allowed, the tenant must exist.
    chromadb_tenant: str = Field("default_tenant", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{1,126}[A-Za-z0-9]$")
    chromadb_database: str = Field("default_database", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{1,126}[A-Za-z0-9]$")
    chromadb_path: Path = Path("data/chroma")
    # Chroma's collection name rules, with room for the suffixes the daemon adds.
    chromadb_collection: str = Field("ings_memory", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{1,60}[A-Za-z0-9]$")

    # Models
    huggingface_token: SecretStr | None = None
    ings_embedding_model_path: Path | None = None
    # None: by precision, 32 texts in float32 and 64 in bfloat16 (storage/embedder.py).
    ings_embedding_batch_size: int | None = Field(None, ge=1, le=4096)
    # auto: bfloat16 autocast on CPUs with AVX-512 BF16 or AMX, else float32.
    ings_embedding_precision: Literal["auto", "float32", "bfloat16"] = "auto"
    ings_base_model: str = ""
    ings_models_dir: Path = Path("data/models")
    ings_allowed_base_models: Annotated[list[str], NoDecode] = []
    ings_adapter_dir: Path = Path("data/adapters")
    # A persona whose model_type is one of these, or ends in "_api", is served by an online
    # backend (the INGS examples: xai_grok, qwen_api): its memory is kept, nothing is trained.
    ings_online_model_types: Annotated[list[str], NoDecode] = ["xai_grok", "qwen_api", "openai", "anthropic", "gemini"]

    # Behaviour
    ings_role: Role = "all"
    ings_http_host: str = "0.0.0.0"
    ings_http_port: int = Field(8000, ge=0, le=65535)
    # The INGS guide's HTTP commands (POST /handshake, /tune, /interact, /recall and
    # GET /personas/{did}) on the same port, produced to Kafka; on by default in `dev`.
    ings_http_ingress: bool = False
    # When set, those routes need `Authorization: Bearer <token>` (probes and /metrics do not).
    ings_http_token: SecretStr | None = None
    # Interactions for new personas beyond this many are dead-lettered (persona_limit).
    # Memory lives in persona buckets, so a persona costs its records and an index entry;
    # bench/personas_bench.py measured 20,000 within the targets; 50,000 x 10 memories is
    # about 1.2 GiB on the Chroma server, extrapolated (docs/operations.md, Many personas).
    ings_max_personas: int = Field(50_000, ge=1, le=10_000_000)
    ings_min_examples: int = Field(10, ge=1, le=100_000)
    ings_max_wait_s: float = Field(3600.0, gt=0)
    # A job's claim check lists its example ids: 20,000 of them stay well under 1 MiB.
    ings_max_job_examples: int = Field(500, ge=1, le=20_000)
    ings_max_event_bytes: int = Field(1_000_000, ge=1_024)
    ings_retry_max_s: float = Field(30.0, gt=0)
    # A batch failing longer than this makes /readyz answer 503 and ings_consumer_stalled 1.
    ings_stall_s: float = Field(60.0, gt=0)
    ings_shutdown_timeout_s: float = Field(30.0, gt=0)
    ings_quality_gate: bool = True
    # The gate's learned and retention checks (trainer/gate.py; bench/RESULTS.md "Default plan").
    ings_gate_min_learned: float = Field(0.5, ge=0, le=1)
    ings_gate_max_retention_kl: float = Field(1.35, gt=0)
    # Feedback (ings.feedback, docs/training.md "Feedback and preference runs"): a persona's
    # jobs add a preference phase once this many of its memories carry a label, and this
    # many new labels trigger a job; the phase is kept when at least this share of held-out
    # comparisons favour the chosen answer. 8 labels already removed a disliked habit in
    # bench/preference_bench.py, but hold out only 2; 16 hold out 3, with the same result
    # (bench/RESULTS.md, "Preference runs").
    ings_preference_min_labels: int = Field(16, ge=2, le=100_000)
    ings_gate_min_preference: float = Field(0.75, ge=0, le=1)
    # Feedback on an exchange not stored yet waits this long, at most this many in all,
    # then is answered `rejected` on ings.feedback-result.
    ings_feedback_wait_s: float = Field(600.0, gt=0, allow_inf_nan=False)
    ings_feedback_max_waiting: int = Field(10_000, ge=0, le=1_000_000)
    # Recall ranks by cosine similarity plus this for a memory rated up (minus for down).
    ings_recall_feedback_boost: float = Field(0.05, ge=0, le=1)
    # Privacy: memories older than this many days are erased by a periodic sweep (0: kept),
    # every INGS_RETENTION_SWEEP_S; an erasure that retires adapters retrains the persona
    # without the erased data when INGS_ERASURE_RETRAIN is on.
    ings_memory_retention_days: float = Field(0.0, ge=0)
    ings_retention_sweep_s: float = Field(3600.0, gt=0)
    ings_erasure_retrain: bool = False
    # E-mails, phones, cards, IBANs, IPs and API keys in interactions and tune examples are
    # replaced by [EMAIL], [PHONE], ... before anything is embedded, stored or trained on.
    ings_redact_pii: bool = False
    # A run still going after this long is stopped and fails (0: no limit).
    ings_train_timeout_s: float = Field(3600.0, ge=0)
    # Jobs of this many examples up hold 10% (at least 2) out and are gated.
    ings_gate_min_examples: int = Field(10, ge=4, le=100_000)
    ings_train_device: Literal["auto", "cpu", "cuda"] = "auto"
    # Trades compute for activation memory on long sequences or larger bases.
    ings_gradient_checkpointing: bool = False
    ings_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Serving (docs/serving.md): vLLM servers kept in step with the adapters, as
    # comma-separated base URLs (http://vllm:8000), and/or a LoRA resolver folder.
    ings_vllm_urls: Annotated[list[str], NoDecode] = []
    # The servers' `--api-key`, sent as a bearer token; never logged.
    ings_vllm_api_key: SecretStr | None = None
    ings_serving_resolver_dir: Path | None = None
    # Where the servers see INGS_ADAPTER_DIR (another mount point); default: the same path.
    ings_serving_adapter_root: Path | None = None
    # The servers' `--max-lora-rank`: a trainer with it set only makes adapters they load.
    # Unset, it is vLLM's default (16) wherever this process syncs servers, else unchecked.
    ings_serving_max_lora_rank: int | None = Field(None, ge=1, le=512)
    # Persona chat (POST /v1/chat/completions): memories recalled into the system turn.
    ings_chat_memories: int = Field(3, ge=0, le=20)
    ings_chat_timeout_s: float = Field(300.0, gt=0)

    @field_validator("ings_allowed_base_models", "ings_online_model_types", "ings_vllm_urls", mode="before")
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator(
        "huggingface_token",
        "kafka_sasl_password",
        "chromadb_host",
        "chromadb_auth_token",
        "chromadb_ssl_ca_file",
        "ings_http_token",
        "ings_vllm_api_key",
        "ings_serving_resolver_dir",
        "ings_serving_max_lora_rank",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        # Compose passes `${VAR:-}` as an empty string when the host has none.
        return None if value == "" else value

    @field_validator("chromadb_collection")
    @classmethod
    def _chroma_name(cls, value: str) -> str:
        if ".." in value:
            raise ValueError("must not contain '..' (Chroma refuses such collection names)")
        return value

    @field_validator("ings_http_token", "chromadb_auth_token")
    @classmethod
    def _usable_token(cls, value: SecretStr | None) -> SecretStr | None:
        # HTTP strips a header value's surrounding spaces: such a token could never match.
        token = value.get_secret_value() if value else ""
        if value is not None and (token != token.strip() or not token.isprintable()):
            raise ValueError("must not begin or end with spaces nor hold control characters")
        return value

    @field_validator("ings_vllm_urls")
    @classmethod
    def _http_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not re.fullmatch(r"https?://[A-Za-z0-9._~%-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~%/-]*)?", url):
                raise ValueError(f"{url[:100]!r} is not an http(s) base URL such as http://vllm:8000")
        return [url.rstrip("/") for url in urls]

    @field_validator("ings_serving_max_lora_rank")
    @classmethod
    def _vllm_rank(cls, rank: int | None) -> int | None:
        if rank is not None and rank not in VLLM_LORA_RANKS:
            raise ValueError(f"vLLM's --max-lora-rank is one of {', '.join(map(str, VLLM_LORA_RANKS))}")
        return rank

    @model_validator(mode="after")
    def _check_security(self) -> Settings:
        if self.kafka_security_protocol.startswith("SASL") and not (
            self.kafka_sasl_username and self.kafka_sasl_password
        ):
            raise ValueError("KAFKA_SECURITY_PROTOCOL=SASL_* needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD")
        for path in (self.kafka_ssl_cafile, self.kafka_ssl_certfile, self.kafka_ssl_keyfile):
            if path is not None and not path.is_file():
                raise ValueError(f"Kafka SSL file {path} does not exist")
        return self

    @property
    def serving(self) -> bool:
        """Whether this process keeps vLLM servers or a resolver folder in step."""
        return bool(self.ings_vllm_urls or self.ings_serving_resolver_dir)

    def serving_max_lora_rank(self) -> int | None:
        """The highest rank the servers load (None: unchecked)."""
        return self.ings_serving_max_lora_rank or (16 if self.serving else None)

    @property
    def topics(self) -> Topics:
        return Topics.with_prefix(self.ings_topic_prefix)

    def kafka_common(self) -> dict[str, Any]:
        """Connection keywords shared by aiokafka's producer, consumer and admin client."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.kafka_bootstrap_servers,
            "security_protocol": self.kafka_security_protocol,
        }
        if self.kafka_security_protocol.endswith("SSL"):
            context = ssl.create_default_context(cafile=str(self.kafka_ssl_cafile) if self.kafka_ssl_cafile else None)
            context.check_hostname = self.kafka_ssl_check_hostname
            if self.kafka_ssl_certfile:
                context.load_cert_chain(
                    str(self.kafka_ssl_certfile),
                    str(self.kafka_ssl_keyfile) if self.kafka_ssl_keyfile else None,
                )
            options["ssl_context"] = context
        if self.kafka_security_protocol.startswith("SASL"):
            assert self.kafka_sasl_password is not None  # checked by _check_security
            options["sasl_mechanism"] = self.kafka_sasl_mechanism
            options["sasl_plain_username"] = self.kafka_sasl_username
            options["sasl_plain_password"] = self.kafka_sasl_password.get_secret_value()
        return options

    def allowed_base_models(self) -> set[str]:
        """Ids a train job may load: the explicit list, else the default base and local models."""
        if self.ings_allowed_base_models:
            return set(self.ings_allowed_base_models)
        allowed = {self.ings_base_model} if self.ings_base_model else set()
        if self.ings_models_dir.is_dir():
            # Dot-folders are imports in progress (or killed mid-way), never models.
            allowed.update(
                p.name
                for p in self.ings_models_dir.iterdir()
                if not p.name.startswith(".") and (p / "config.json").is_file()
            )
        return allowed


def load_settings(**overrides: Any) -> Settings:
    """Build settings or exit (SystemExit, status 1) with one line naming each wrong
    setting by its environment name, and no traceback."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(_problem(err["loc"], err["msg"]) for err in exc.errors())
        raise SystemExit(
            f"ings-daemon: invalid configuration: {problems}; fix it in the environment or .env "
            "(`ings-daemon run --help` lists the settings)"
        ) from None


def _problem(loc: tuple[int | str, ...], msg: str) -> str:
    name = ".".join(str(part) for part in loc).upper()
    # A check across settings has no single field; its message names the settings itself.
    return f"{name}: {msg}" if name else msg.removeprefix("Value error, ")
