"""The event models: the public contract on every topic.

Input models accept the INGS guide's documents unchanged (unknown top-level keys of a
persona document are kept, not rejected). Output models are what this daemon publishes.
`schemas/` is generated from this module by `ings-daemon schemas`.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    PlainValidator,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from .ids import DID_PATTERN, utcnow

Did = Annotated[str, StringConstraints(pattern=DID_PATTERN)]
Text = Annotated[str, StringConstraints(min_length=1, max_length=16_000)]
ShortText = Annotated[str, StringConstraints(max_length=256)]
TuneState = Literal["accepted", "rejected", "started", "progress", "succeeded", "failed"]
# The quality gate's decision on a run (trainer/gate.py): every check passed or one failed;
# too few examples to hold any out (not_gated); or INGS_QUALITY_GATE=false (off).
GateDecision = Literal["passed", "failed", "not_gated", "off"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


def _json_object(value: object) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError("must be a JSON object")
    return value


# Free-form JSON kept exactly as sent: no whitespace stripped from its keys or strings (two
# keys differing only by a space stay two keys). Decoding has already bounded its depth and
# checked its text.
JsonObject = Annotated[dict[str, Any], PlainValidator(_json_object), WithJsonSchema({"type": "object"})]
# An interaction's metadata as compact JSON; the record as a whole is bounded by
# INGS_MAX_EVENT_BYTES, this keeps each stored memory (and each recall result) small.
MAX_METADATA_CHARS = 16_000


# --- inputs -------------------------------------------------------------------------------


class LoraSpec(Strict):
    """The guide's `lora_config`, with the optional knobs a run accepts. Numbers and flags
    are strict: `"3"` or `true` where a number belongs is an error, not a conversion."""

    model_name: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    # Defaults measured on SmolLM2-135M-Instruct (bench/RESULTS.md, "Default plan").
    rank: StrictInt = Field(16, ge=1, le=256)
    alpha: StrictFloat = Field(32, gt=0, le=4096)
    dropout: StrictFloat = Field(0.05, ge=0, lt=1)
    target_modules: list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.]{1,64}$")]] | None = None
    # Neither set: the trainer's default plan (6 passes, at least 60 steps, 2 passes past 200;
    # trainer.lora.planned_steps). max_steps wins over epochs.
    epochs: StrictInt | None = Field(None, ge=1, le=100)
    max_steps: StrictInt | None = Field(None, ge=1, le=100_000)
    learning_rate: StrictFloat = Field(1e-3, gt=0, le=1)
    max_seq_len: StrictInt = Field(512, ge=16, le=8192)
    # Self-distillation replay: the base model's own answers to general prompts mixed into
    # the run, this many per training example (at most 24 in all), so that the adapter does
    # not forget how to answer everything else (trainer/retention.py). 0 turns it off.
    replay_ratio: StrictFloat = Field(1.0, ge=0, le=4)
    # QLoRA: the base loaded in 4 bits (NF4, double quantisation, bfloat16 compute) or 8 bits
    # with bitsandbytes; CUDA only.
    quantization: Literal["4bit", "8bit"] | None = None


class PersonaInfo(Strict):
    persona_id: Did | None = None
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    model_type: ShortText = "llm"
    default_mode: ShortText = "default"
    description: Annotated[str, StringConstraints(max_length=8_000)] = ""
    metadata: JsonObject = Field(default_factory=dict)
    # The persona's own LoRA defaults (rank, alpha, base model...) for its auto jobs.
    lora_config: LoraSpec | None = None


class Handshake(BaseModel):
    """A persona document as the INGS guide writes it: `{"version", ..., "persona": {...}}`."""

    model_config = ConfigDict(extra="allow", str_strip_whitespace=True)

    event_id: ShortText | None = None
    version: ShortText | None = None
    persona: PersonaInfo


# The INGS origin's names for three interaction fields (its records say `message`,
# `response` and `timestamp`), accepted as alternatives to this contract's own.
ORIGIN_NAMES = {"input": "message", "output": "response", "occurred_at": "timestamp"}


class Interaction(Strict):
    """One exchange to remember. Three forms are accepted (`schemas/interaction.schema.json`
    documents each): the flat event; the same with the INGS origin's field names
    (`message`, `response`, `timestamp`); and either wrapped as the origin's records are,
    `{"version", ..., "interaction": {...}}`, where the wrapper's other fields are accepted
    and ignored, as a handshake's are, and its `event_id` applies when the inner has none.
    `metadata` is any JSON object (see `storage.metadata` for how it is stored)."""

    persona_id: Did
    input: Text = Field(validation_alias=AliasChoices("input", "message"))
    output: Text = Field(validation_alias=AliasChoices("output", "response"))
    event_id: ShortText | None = None
    session_id: ShortText | None = None
    mode: ShortText | None = None
    occurred_at: datetime | None = Field(None, validation_alias=AliasChoices("occurred_at", "timestamp"))
    metadata: JsonObject = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _origin_form(cls, data: Any) -> Any:
        if isinstance(data, dict) and "interaction" in data:
            if "persona_id" in data:
                raise ValueError("`persona_id` belongs inside `interaction`, not beside it, in a wrapped record")
            inner = data["interaction"]
            if not isinstance(inner, dict):
                raise ValueError("`interaction` must be an object holding the interaction")
            if "interaction" in inner:
                raise ValueError("a wrapped record inside another: give `interaction` one level deep")
            if "event_id" not in inner and data.get("event_id") is not None:
                inner = {**inner, "event_id": data["event_id"]}
            data = inner
        if isinstance(data, dict):
            for name, origin in ORIGIN_NAMES.items():
                if name in data and origin in data:
                    raise ValueError(f"give `{name}` or `{origin}`, not both")
        return data

    @field_validator("occurred_at", mode="before")
    @classmethod
    def _iso_text(cls, value: object) -> object:
        # ISO 8601 text only: a bare number would be read as Unix seconds, silently.
        if value is not None and not isinstance(value, str | datetime):
            raise ValueError("occurred_at (timestamp) must be an ISO 8601 date-time string")
        return value

    @field_validator("occurred_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    @field_validator("metadata", mode="before")
    @classmethod
    def _null_is_empty(cls, value: object) -> object:
        return {} if value is None else value

    @field_validator("metadata")
    @classmethod
    def _bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")))
        if size > MAX_METADATA_CHARS:
            raise ValueError(f"metadata is {size} characters as JSON; at most {MAX_METADATA_CHARS}")
        return value

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        """Every accepted form: either name of each renamed field (exactly one of the pair
        for `input` and `output`, at most one for `occurred_at`), flat or wrapped."""
        flat = handler.resolve_ref_schema(handler(core_schema))
        props, required = flat["properties"], set(flat.get("required", []))
        one_of_pair: list[dict[str, Any]] = []
        for name, origin in ORIGIN_NAMES.items():
            props[origin] = {**props[name], "title": origin.title()}
            if name in required:
                required.discard(name)
                one_of_pair.append({"oneOf": [{"required": [name]}, {"required": [origin]}]})
            else:
                one_of_pair.append({"not": {"required": [name, origin]}})
        flat["required"] = sorted(required)
        flat["allOf"] = one_of_pair
        inner = {k: v for k, v in flat.items() if k not in ("title", "description")}
        wrapped = {
            "type": "object",
            "title": "Wrapped interaction",
            "description": "The INGS origin's record: other fields are accepted and ignored.",
            "properties": {"interaction": inner, "version": {"type": "string"}, "event_id": props["event_id"]},
            "required": ["interaction"],
            "not": {"required": ["persona_id"]},
        }
        return {"title": flat.get("title"), "description": flat.get("description"), "anyOf": [inner, wrapped]}


class Example(Strict):
    input: Text
    output: Text


class TuneRequest(Strict):
    persona_id: Did
    training_data: list[Example] = Field(default_factory=list, max_length=10_000)
    lora_config: LoraSpec = Field(default_factory=LoraSpec)
    include_memory: StrictBool = False
    event_id: ShortText | None = None
    request_id: ShortText | None = None


# A request id matches an answer to its request: never empty.
RequestId = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class RecallRequest(Strict):
    persona_id: Did
    query: Text
    k: StrictInt = Field(5, ge=1, le=100)
    request_id: RequestId
    event_id: ShortText | None = None


# --- outputs ------------------------------------------------------------------------------


class Persona(Strict):
    """A registered persona as published on the compacted `ings.persona` topic."""

    persona_id: Did
    name: str
    model_type: str
    default_mode: str
    description: str
    metadata: JsonObject
    lora_config: LoraSpec | None = None
    document_version: str | None
    minted: bool
    source_event_id: str
    registered_at: datetime
    updated_at: datetime


class Memory(Strict):
    id: str
    persona_id: Did
    input: str
    output: str
    score: float
    session_id: str | None = None
    mode: str | None = None
    occurred_at: datetime | None = None
    # The interaction's metadata exactly as it was sent.
    metadata: JsonObject = Field(default_factory=dict)
    # Its latest feedback (ings.feedback): the label and the user's corrected answer.
    feedback: Literal["up", "down", "neutral"] | None = None
    correction: str | None = None


class RecallResult(Strict):
    request_id: str
    persona_id: Did
    query: str
    results: list[Memory]
    # True when the k best memories did not fit one Kafka message (KAFKA_MAX_MESSAGE_BYTES)
    # and the lowest-scored ones were left out.
    truncated: bool = False


class TrainExample(Strict):
    """One (input, output) pair of a run; `id` is its record id in Chroma. `feedback` and
    `correction` are the exchange's latest feedback (`contract.feedback`) when the trainer
    read it; they are not part of the content hash, since feedback may come at any time."""

    id: str
    input: str
    output: str
    feedback: Literal["up", "down"] | None = None
    correction: str | None = None


class ExampleSet(Strict):
    """A claim check for a train job's examples: they stay in Chroma (interactions in the
    memory collection, tune-request examples in the examples collection) and the job carries
    their ids, in order, with the sha256 of their content (`contract.examples.examples_sha256`),
    so the job stays small and a replay trains on exactly the same data or not at all."""

    collection: Literal["memory", "examples"]
    ids: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(max_length=20_000)
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]

    @field_validator("ids")
    @classmethod
    def _unique(cls, ids: list[str]) -> list[str]:
        if len(set(ids)) != len(ids):
            raise ValueError("example ids must be unique")
        return ids


class TrainJob(Strict):
    """One LoRA run. `job_id` is derived from the persona and its examples, so a replayed
    trigger names the same job and the trainer does not run it twice."""

    job_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]
    persona_id: Did
    trigger: ShortText  # "auto" or the tune request's id
    base_model: str
    lora: LoraSpec
    examples: ExampleSet
    # The persona's memories that carry feedback (up/down or a correction), when it has at
    # least INGS_PREFERENCE_MIN_LABELS: the run adds a preference phase (KTO or DPO) on them.
    preference: ExampleSet | None = None
    created_at: datetime


# What a run trained with: supervised fine-tuning alone, or followed by a preference phase,
# KTO (unpaired up/down labels; Ethayarajh et al. 2024) or DPO (pairs from corrections;
# Rafailov et al. 2023).
Objective = Literal["sft", "kto", "dpo"]


class TuneStatus(Strict):
    persona_id: Did | None
    status: TuneState
    job_id: str | None = None
    request_id: str | None = None
    reason: str | None = None
    advice: str | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    version: int | None = None
    gate: GateDecision | None = None
    eval_loss: float | None = None
    base_eval_loss: float | None = None
    previous_eval_loss: float | None = None
    fit_loss: float | None = None
    base_fit_loss: float | None = None
    learned: float | None = None
    retention_kl: float | None = None
    objective: Objective | None = None
    preference_accuracy: float | None = None
    at: datetime = Field(default_factory=utcnow)


class AdapterMetrics(Strict):
    train_loss_first: float
    train_loss_last: float
    eval_loss: float | None
    base_eval_loss: float | None
    previous_eval_loss: float | None
    examples: int
    eval_examples: int
    tokens: int
    steps: int
    duration_s: float
    gate: GateDecision = "not_gated"
    # The gate's other figures (trainer/gate.py): loss on the training examples, adapter and
    # base; the share of the base's loss removed; KL(base || adapter) on general prompts.
    fit_loss: float | None = None
    base_fit_loss: float | None = None
    learned: float | None = None
    retention_kl: float | None = None
    # The version previous_eval_loss was measured on: the newest on the same base model
    # whose training examples the held-out split avoids (None: no fair comparison).
    compared_version: int | None = None
    # The preference phase (trainer/preference.py): the objective of the adapter announced
    # ("sft" when there was none, or when its gate refused it and the supervised adapter was
    # kept), how many labelled examples trained and were held out, the share of held-out
    # comparisons the phase got right against its supervised parent, its gate decision
    # and, when refused, why.
    objective: Objective = "sft"
    preference_labels: int = 0
    preference_eval_labels: int = 0
    preference_accuracy: float | None = None
    preference_gate: GateDecision | None = None
    preference_refused: str | None = None


class AdapterReady(Strict):
    persona_id: Did
    version: int
    adapter_path: str
    adapter_uri: str
    base_model: str
    lora: LoraSpec
    metrics: AdapterMetrics
    trigger: str
    job_id: str
    checksums: dict[str, str]
    # How prompts must be rendered to serve it: "chat_template" (the base tokenizer's own,
    # identified by its sha256) or "plain" (BOS + "### Input:\n...\n### Response:\n").
    prompt_format: Literal["plain", "chat_template"] = "plain"
    chat_template_sha256: str | None = None
    created_at: datetime


class DeadLetter(Strict):
    """A record that could not be processed, with where it came from and why.

    `value_b64` holds the original value when the letter fits KAFKA_MAX_MESSAGE_BYTES,
    otherwise its first bytes (`value_truncated` true); `value_size` and `value_sha256`
    always describe the whole original. A batch that could not be fetched at all is
    dead-lettered by its coordinates alone (`value_b64` null, error_type `fetch_error`).
    """

    # The record's key and the reason are kept as they were, whitespace included.
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    topic: str
    partition: int
    offset: int
    key: str | None
    value_b64: str | None
    value_truncated: bool = False
    value_size: int
    value_sha256: str | None
    reason: str
    error_type: str
    at: datetime = Field(default_factory=utcnow)
