"""The reference engine: a CPU worker that speaks SGLang's HTTP API and prefill/decode protocol.

Run it with ``python -m replicas.engine`` (see ``config.py`` for the flags). Importing this package
is light: torch is imported only when a torch model is loaded.
"""
