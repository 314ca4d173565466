"""The public contract: event models, ids and DIDs, the example formats. Imports nothing
of the runtime, so the training worker process can load it without Kafka or Chroma."""
