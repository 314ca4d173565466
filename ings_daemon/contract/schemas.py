"""Every event model with a published JSON Schema (`schemas/`, by `ings-daemon schemas`)."""

from __future__ import annotations

from pydantic import BaseModel

from .erasure import AdapterRetired, ForgetRequest, ForgetResult
from .events import (
    AdapterReady,
    DeadLetter,
    Handshake,
    Interaction,
    Persona,
    RecallRequest,
    RecallResult,
    TrainJob,
    TuneRequest,
    TuneStatus,
)
from .feedback import Feedback, FeedbackResult
from .serving import ServedModel

# By file name stem.
SCHEMAS: dict[str, type[BaseModel]] = {
    "handshake": Handshake,
    "interaction": Interaction,
    "tune-request": TuneRequest,
    "recall-request": RecallRequest,
    "forget": ForgetRequest,
    "feedback": Feedback,
    "persona": Persona,
    "recall-result": RecallResult,
    "train-job": TrainJob,
    "tune-status": TuneStatus,
    "adapter-ready": AdapterReady,
    "forget-result": ForgetResult,
    "adapter-retired": AdapterRetired,
    "served-model": ServedModel,
    "feedback-result": FeedbackResult,
    "dlq": DeadLetter,
}
