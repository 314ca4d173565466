"""The trainer role: LoRA runs in a worker process, base-model resolution, the adapter store."""
