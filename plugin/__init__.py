"""vLLM plugin: the ProcessFork KV connector (data plane) and HTTP routes (control plane)."""
