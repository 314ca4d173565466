"""The training worker: a child process that owns the base model and runs LoRA jobs.

A run takes minutes of CPU or GPU time and may use all the memory there is; in its own
process it can neither block the daemon's event loop nor take the daemon down when it
crashes. The child keeps the base model loaded between jobs on the same base (loading is
often slower than training), and answers every request with a `WorkOutcome`: a failure of
a run is an outcome, not an exception, and the child lives on for the next job.

Protocol over one duplex Pipe: the parent sends a `WorkRequest` (or None to stop); the
child answers with ("progress", step, total, loss) messages, then ("outcome", WorkOutcome).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from ..contract.events import AdapterMetrics, TrainExample, TrainJob
from .gate import GateFigures, GateLimits

log = logging.getLogger(__name__)

CONVERGENCE_ADVICE = "convergence trouble: lower the rank or raise alpha (or lower the learning rate)"


def memory_advice(request: WorkRequest, cuda: bool) -> str:
    """What to change after running out of memory, as the exact settings to send, cheapest
    first: gradient checkpointing, 4-bit quantisation (CUDA only), half the sequence length."""
    steps = [] if request.gradient_checkpointing else ["set INGS_GRADIENT_CHECKPOINTING=true"]
    if cuda and request.job.lora.quantization != "4bit":
        steps.append('send lora_config.quantization "4bit"')
    steps.append(f"send lora_config.max_seq_len {max(16, request.job.lora.max_seq_len // 2)}")
    return "out of memory: " + ", or ".join(steps) + ", or use a smaller base model"


TIMEOUT_ADVICE = "send fewer epochs, fewer or shorter examples, or a lower max_seq_len"


@dataclass
class WorkRequest:
    job: TrainJob
    examples: list[TrainExample]
    base_model_path: str
    tmp_dir: Path
    previous_adapter: Path | None = None
    previous_version: int | None = None
    gate: GateLimits = field(default_factory=GateLimits)
    device: str = "auto"
    gradient_checkpointing: bool = False
    system: str | None = None  # the persona's description: a chat template's system turn
    previous_trained: frozenset[str] = frozenset()  # the previous adapter's training ids
    gate_min_examples: int = 10
    preference: list[TrainExample] = field(default_factory=list)  # labelled examples, with feedback


@dataclass
class WorkOutcome:
    ok: bool
    metrics: AdapterMetrics | None = None
    checksums: dict[str, str] = field(default_factory=dict)
    reason: str | None = None
    advice: str | None = None
    error_type: str | None = None
    base_model_loaded_s: float = 0.0
    worker_rss_bytes: int = 0
    # The figures of a run the quality gate refused.
    gate_figures: GateFigures | None = None


def _failed(reason: str, advice: str | None, error_type: str, **extra: Any) -> WorkOutcome:
    return WorkOutcome(ok=False, reason=reason, advice=advice, error_type=error_type, **extra)


# --- parent side ---------------------------------------------------------------------------


class TrainingWorker:
    """Runs jobs one at a time in a lazily started child process."""

    def __init__(self, *, stop_timeout_s: float = 10.0) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._busy = False
        self._idle: asyncio.Event | None = None
        self._closing = False
        self._stop_timeout_s = stop_timeout_s

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.is_alive() else None

    async def _ensure_started(self) -> Connection:
        if self._proc is not None and self._proc.is_alive() and self._conn is not None:
            return self._conn
        await self._reap()
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_child_main, args=(child_conn,), name="ings-trainer", daemon=True)
        await asyncio.to_thread(proc.start)
        # Only the child may hold its end: otherwise its death would never read as EOF here.
        child_conn.close()
        self._proc, self._conn = proc, parent_conn
        log.info("training worker started, pid %s", proc.pid)
        return parent_conn

    async def _reap(self) -> int | None:
        """Forget the current child (already dead or being replaced); its exit code."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            conn.close()
        if proc is None:
            return None
        await asyncio.to_thread(proc.join, self._stop_timeout_s)
        if proc.is_alive():
            proc.kill()
            await asyncio.to_thread(proc.join, self._stop_timeout_s)
        code = proc.exitcode
        proc.close()
        return code

    async def run(
        self,
        request: WorkRequest,
        on_progress: Callable[[int, int, float], Awaitable[None]],
        timeout_s: float | None = None,
    ) -> WorkOutcome:
        """Run one job in the child; its outcome. After `timeout_s` the child is killed and
        the job fails (error_type TrainingTimeout); the next job starts a fresh child."""
        if self._busy:
            raise RuntimeError("TrainingWorker runs one job at a time")
        self._busy = True
        self._closing = False
        self._idle = asyncio.Event()
        try:
            conn = await self._ensure_started()
            try:
                async with asyncio.timeout(timeout_s):
                    # A large job pickles to megabytes; writing it must not stall the loop.
                    await asyncio.to_thread(conn.send, request)
                    while True:
                        message = await self._receive(conn)
                        if message[0] == "progress":
                            await on_progress(message[1], message[2], message[3])
                        elif message[0] == "outcome":
                            outcome: WorkOutcome = message[1]
                            return outcome
            except TimeoutError:
                await self._stop_child(graceful=False)
                reason = f"training took longer than {timeout_s:.0f} s (INGS_TRAIN_TIMEOUT_S) and was stopped"
                return _failed(reason, TIMEOUT_ADVICE, "TrainingTimeout")
            except (EOFError, OSError):
                code = await self._reap()
                if self._closing:
                    return _failed("training worker was stopped during the job", None, "WorkerStopped")
                log.error("training worker crashed (exit code %s) during job %s", code, request.job.job_id)
                return _crashed(code, request)
        except BaseException:
            # Cancelled (shutdown) or broken mid-conversation: the child may still be
            # training and would answer the next request with this job's messages.
            await self._stop_child(graceful=False)
            raise
        finally:
            self._busy = False
            self._idle.set()

    async def _receive(self, conn: Connection) -> Any:
        loop = asyncio.get_running_loop()
        while not conn.poll():
            ready: asyncio.Future[None] = loop.create_future()
            fd = conn.fileno()
            loop.add_reader(fd, _wake, ready)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
        # Readable means a whole small message or EOF; the child only sends small ones.
        return conn.recv()

    async def _stop_child(self, *, graceful: bool) -> None:
        proc, conn = self._proc, self._conn
        if proc is None:
            return
        if graceful and conn is not None and proc.is_alive():
            with contextlib.suppress(OSError, ValueError):
                conn.send(None)
        elif proc.is_alive():
            proc.terminate()
        await self._reap()

    async def close(self) -> None:
        """Stop the child: politely when idle; by signal when a job is still running, in
        which case that job's `run` returns a failed outcome with error_type WorkerStopped."""
        self._closing = True
        if self._busy and self._idle is not None:
            if self._proc is not None and self._proc.is_alive():
                self._proc.terminate()
            # run() sees the EOF and reaps the child itself; two reapers would race.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self._stop_timeout_s * 2)
        await self._stop_child(graceful=True)


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def _crashed(code: int | None, request: WorkRequest) -> WorkOutcome:
    advice = None
    if code is not None and code == -signal.SIGKILL:
        # SIGKILL is what the kernel's OOM killer sends.
        advice = memory_advice(request, cuda=request.device != "cpu")
    return _failed(f"training worker crashed (exit code {code})", advice, "WorkerCrashed")


# --- child side ----------------------------------------------------------------------------


class _BaseCache:
    """The loaded base model and tokenizer, kept between jobs on the same base."""

    def __init__(self) -> None:
        self.key: tuple[str, str, str | None] | None = None
        self.model: Any = None
        self.tokenizer: Any = None

    def evict(self) -> None:
        self.key = self.model = self.tokenizer = None
        from ings_daemon.trainer.lora import release_memory

        release_memory()

    def get(self, path: str, device: str, quantization: str | None = None) -> tuple[Any, Any, float]:
        """(model, tokenizer, seconds spent loading: 0.0 when it was already loaded).

        With `quantization` the base is loaded by bitsandbytes on the GPU (QLoRA: NF4 with
        double quantisation and bfloat16 compute, or 8-bit), as peft's QLoRA guide does.
        """
        key = (path, device, quantization)
        if self.key == key:
            return self.model, self.tokenizer, 0.0
        self.evict()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ings_daemon.trainer.targets import autocast_dtype, resolve_device

        started = time.monotonic()
        dev = resolve_device(device)
        # bf16 weights on GPUs that support it halve memory; CPU kernels want float32.
        dtype = torch.bfloat16 if autocast_dtype(dev) is not None else torch.float32
        load: dict[str, Any] = {"dtype": dtype}
        if quantization is not None:
            load = _quantized_loading(quantization, dev)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, trust_remote_code=False, **load)
        except (torch.OutOfMemoryError, MemoryError):
            raise
        except Exception as exc:
            raise _BaseLoadError(f"base model at {path} could not be loaded: {exc}") from exc
        if quantization is None:
            model.to(dev)
        else:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model.eval()
        self.key, self.model, self.tokenizer = key, model, tokenizer
        return model, tokenizer, round(time.monotonic() - started, 3)


def _quantized_loading(quantization: str, dev: Any) -> dict[str, Any]:
    """from_pretrained arguments for a bitsandbytes base; _BaseLoadError where it cannot be."""
    import importlib.util

    import torch
    from transformers import BitsAndBytesConfig

    if dev.type != "cuda":
        raise _BaseLoadError(f'lora_config.quantization "{quantization}" needs a CUDA GPU; this trainer has none')
    if importlib.util.find_spec("bitsandbytes") is None:
        raise _BaseLoadError(f'lora_config.quantization "{quantization}" needs bitsandbytes: pip install bitsandbytes')
    if quantization == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config, "device_map": {"": dev.index or 0}, "dtype": torch.bfloat16}


class _BaseLoadError(Exception):
    pass


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _run_job(request: WorkRequest, cache: _BaseCache, conn: Connection) -> WorkOutcome:
    import torch

    from ings_daemon.basemodels import revision_of
    from ings_daemon.trainer.gate import QualityGateFailed
    from ings_daemon.trainer.lora import TrainingDiverged, train_adapter

    def progress(step: int, total: int, loss: float) -> None:
        conn.send(("progress", step, total, loss))

    loaded_s = 0.0
    try:
        model, tokenizer, loaded_s = cache.get(request.base_model_path, request.device, request.job.lora.quantization)
        result = train_adapter(
            model,
            tokenizer,
            request.job,
            request.examples,
            request.tmp_dir,
            previous_adapter=request.previous_adapter,
            gate=request.gate,
            on_progress=progress,
            gradient_checkpointing=request.gradient_checkpointing,
            device=request.device,
            parent_version=request.previous_version,
            base_revision=revision_of(request.base_model_path),
            system=request.system,
            previous_trained=request.previous_trained,
            gate_min_examples=request.gate_min_examples,
            preference=request.preference,
        )
        return WorkOutcome(ok=True, metrics=result.metrics, checksums=result.checksums, base_model_loaded_s=loaded_s)
    except TrainingDiverged as exc:
        return _failed(str(exc), CONVERGENCE_ADVICE, "TrainingDiverged", base_model_loaded_s=loaded_s)
    except QualityGateFailed as exc:
        return _failed(
            str(exc), exc.advice, "QualityGateFailed", base_model_loaded_s=loaded_s, gate_figures=exc.figures
        )
    except (torch.OutOfMemoryError, MemoryError) as exc:
        # What the failed allocation left behind is hard to account for; start clean.
        cache.evict()
        reason = f"out of memory: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        advice = memory_advice(request, cuda=isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available())
        return _failed(reason, advice, type(exc).__name__, base_model_loaded_s=loaded_s)
    except _BaseLoadError as exc:
        return _failed(str(exc), None, "BaseModelError")
    except Exception as exc:
        log.error("training job %s failed:\n%s", request.job.job_id, traceback.format_exc())
        return _failed(f"{type(exc).__name__}: {exc}", None, type(exc).__name__, base_model_loaded_s=loaded_s)


def _child_main(conn: Connection) -> None:
    # Ctrl-C reaches the whole process group; the parent decides when the child stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The same one-JSON-object-per-line log as the daemon (a failed run's traceback included).
    from ings_daemon.runtime.logs import setup as setup_logs

    setup_logs("INFO")
    from transformers.utils import logging as hf_logging

    from ings_daemon.trainer.lora import release_memory

    hf_logging.disable_progress_bar()
    cache = _BaseCache()
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if request is None:
            return
        outcome = _run_job(request, cache, conn)
        if not outcome.ok:
            # The failed run's traceback kept its frames (optimizer, batches) alive through
            # train_adapter's own cleanup; they are unreachable only now.
            release_memory()
        outcome.worker_rss_bytes = _rss()
        try:
            conn.send(("outcome", outcome))
        except (OSError, ValueError):
            return
