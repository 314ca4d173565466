"""The ingest role: handshakes, interactions, recall and tune requests, memory and the batcher."""
