"""The daemon's Prometheus metrics, all in prometheus_client's default registry.

Names follow Prometheus conventions (`_total` counters, base units); the deploy files'
tests read this registry, so a renamed metric breaks them rather than a dashboard.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from .. import __version__

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

EVENTS_CONSUMED = Counter("ings_events_consumed_total", "Records fetched from Kafka.", ["topic"])
EVENTS_PROCESSED = Counter("ings_events_processed_total", "Records whose effect is durable.", ["topic"])
EVENTS_FAILED = Counter("ings_events_failed_total", "Transient failures, retried.", ["topic"])
EVENTS_DEAD_LETTERED = Counter(
    "ings_events_dead_lettered_total", "Records sent to the dead-letter topic.", ["topic", "reason"]
)
PROCESSING_SECONDS = Histogram(
    "ings_event_processing_seconds",
    "Time to process one fetched batch of a topic.",
    ["topic"],
    buckets=LATENCY_BUCKETS,
)
EMBEDDING_SECONDS = Histogram("ings_embedding_seconds", "Time to embed one batch.", buckets=LATENCY_BUCKETS)
EMBEDDING_BATCH_SIZE = Histogram("ings_embedding_batch_size", "Texts per embedding batch.", buckets=SIZE_BUCKETS)
CHROMA_WRITE_SECONDS = Histogram("ings_chroma_write_seconds", "Time of one Chroma write.", buckets=LATENCY_BUCKETS)
CONSUME_BATCH_SIZE = Histogram("ings_consume_batch_size", "Records per fetched batch.", buckets=SIZE_BUCKETS)
CONSUMER_LAG = Gauge("ings_consumer_lag", "Highwater minus position.", ["topic", "partition"])
CONSUMER_PAUSED = Gauge("ings_consumer_paused", "1 while consumption is paused for backpressure or retry.")
MEMORY_RECORDS_ADDED = Counter("ings_memory_records_added_total", "Interaction records written to Chroma.")
MEMORY_LAST_ADDED = Gauge(
    "ings_memory_last_added_timestamp_seconds", "Unix time of the last interaction records written to Chroma."
)
PERSONAS_REGISTERED = Counter("ings_personas_registered_total", "Handshakes stored (new or updated).")
TRAIN_JOBS_PUBLISHED = Counter("ings_train_jobs_published_total", "Train jobs published.", ["trigger"])
TRAINING_RUNS = Counter("ings_training_runs_total", "Train jobs ended, by outcome.", ["outcome"])
TRAINING_SECONDS = Histogram(
    "ings_training_duration_seconds",
    "Wall time of a training run.",
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
TRAINING_LAST_LOSS = Gauge("ings_training_last_loss", "Last training loss reported.")
QUALITY_GATE = Counter("ings_quality_gate_total", "Quality gate decisions on finished runs.", ["decision"])
EVAL_LOSS = Gauge(
    "ings_training_last_eval_loss", "Held-out loss of the last gated run, by model.", ["model"]
)  # model: adapter, base, previous
FIT_LOSS = Gauge(
    "ings_training_last_fit_loss", "Loss on its own training examples of the last run, by model.", ["model"]
)  # model: adapter, base
LEARNED = Gauge("ings_training_last_learned", "Share of the base's training-example loss the last run removed.")
RETENTION_KL = Gauge(
    "ings_training_last_retention_kl", "Mean per-token KL(base || adapter) on general prompts of the last run."
)
FEEDBACK = Counter(
    "ings_feedback_total", "Feedback events, by label and outcome (applied, waiting, rejected).", ["label", "outcome"]
)
FEEDBACK_WAITING = Gauge("ings_feedback_waiting", "Feedback events waiting for their exchange to be stored.")
PREFERENCE_LABELS_WAITING = Gauge(
    "ings_preference_labels_waiting", "Labelled examples of owned personas not yet in a preference run's job."
)
PREFERENCE_RUNS = Counter(
    "ings_preference_runs_total",
    "Preference phases of finished runs, by objective and gate decision.",
    ["objective", "gate"],
)
PREFERENCE_ACCURACY = Gauge(
    "ings_training_last_preference_accuracy", "Share of held-out comparisons the last preference phase got right."
)
TRAINING_EXAMPLES = Counter("ings_training_examples_total", "Examples trained on.")
TRAINING_TOKENS = Counter("ings_training_tokens_total", "Tokens trained on.")
TRAINING_QUEUE = Gauge("ings_training_queue_depth", "Train jobs fetched and not yet finished.")
TRAINING_IN_PROGRESS = Gauge("ings_training_in_progress", "1 while a training run is in progress.")
CONSUMER_STALLED = Gauge(
    "ings_consumer_stalled", "1 while a batch has been stuck in retries longer than INGS_STALL_S.", ["group"]
)
CONSUMER_STALL_SECONDS = Gauge(
    "ings_consumer_stall_seconds", "How long the batch in hand has been retrying (0 when none).", ["group"]
)
FETCH_ERRORS = Counter(
    "ings_fetch_errors_total", "Fetches that failed (a batch that cannot be read or decompressed).", ["topic"]
)
EVENTS_TOO_LARGE = Counter(
    "ings_published_events_too_large_total",
    "Events refused before publishing: over KAFKA_MAX_MESSAGE_BYTES.",
    ["topic"],
)
MEMORIES_ERASED = Counter("ings_memories_erased_total", "Memories and tune examples erased, by reason.", ["reason"])
ADAPTERS_RETIRED = Counter(
    "ings_adapters_retired_total", "Adapter versions retired because data they were trained on was erased.", ["reason"]
)
HTTP_REQUESTS = Counter(
    "ings_http_requests_total", "Requests to the HTTP commands (INGS_HTTP_INGRESS), by answer.", ["route", "code"]
)
PII_REDACTIONS = Counter(
    "ings_pii_redactions_total",
    "Identifiers replaced by a placeholder before embedding, storing or training (INGS_REDACT_PII), by kind.",
    ["kind"],
)
SERVING_UP = Gauge(
    "ings_serving_target_up", "1 while a serving target (a vLLM server, the resolver folder) answers.", ["target"]
)
SERVING_ADAPTERS = Gauge("ings_serving_adapters", "Adapter versions this daemon has loaded on a target.", ["target"])
SERVING_OPERATIONS = Counter(
    "ings_serving_operations_total",
    "Adapter loads and unloads on serving targets, by result.",
    ["target", "operation", "result"],
)  # operation: load, unload, reconcile; result: ok, refused, down
SERVABLE_SECONDS = Histogram(
    "ings_serving_servable_seconds",
    "From an adapter version's creation to its load on a serving target.",
    buckets=LATENCY_BUCKETS,
)
CHAT_SECONDS = Histogram(
    "ings_chat_seconds", "Persona chat time by stage: recall, first_token, total.", ["stage"], buckets=LATENCY_BUCKETS
)
READY = Gauge("ings_ready", "1 when the daemon is ready (group joined, Chroma reachable).")
BUILD_INFO = Gauge("ings_build_info", "Build information.", ["version"])
BUILD_INFO.labels(version=__version__).set(1)
# Series exist from the start, so rate() and increase() see the first event.
for _outcome in ("succeeded", "failed", "rejected", "duplicate"):
    TRAINING_RUNS.labels(outcome=_outcome)
for _trigger in ("auto", "request"):
    TRAIN_JOBS_PUBLISHED.labels(trigger=_trigger)
for _kind in ("email", "phone", "card", "iban", "ip", "secret"):  # ingest.redact.KINDS
    PII_REDACTIONS.labels(kind=_kind)
for _label in ("up", "down", "neutral"):
    for _fb_outcome in ("applied", "waiting", "rejected"):
        FEEDBACK.labels(label=_label, outcome=_fb_outcome)
