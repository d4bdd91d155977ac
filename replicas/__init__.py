"""The workers: SGLang launch lines, the node agent, and the reference CPU engine."""
