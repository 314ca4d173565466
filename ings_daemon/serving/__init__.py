"""The serving role: vLLM servers and a LoRA resolver folder kept in step with the adapters, and the persona chat."""
