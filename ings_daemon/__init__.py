"""ings-daemon: Kafka-driven memory and LoRA auto-tuning for INGS personas."""

__version__ = "0.1.0"
