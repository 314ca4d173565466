"""The trainer role: train jobs in, adapters out; the LoRA run happens in a worker process."""
