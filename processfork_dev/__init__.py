"""Development tools of this repository, not part of the package (the wheel does not ship them).

- ``demo``, ``demo_flow``, ``demo_context``: ``make demo`` (``python -m processfork_dev.demo``);
- ``model_builder``: random-weight Llama checkpoints for the tests, the demo and the benchmarks
  (``python -m processfork_dev.model_builder PATH``);
- ``live_server``: the server the integration and GPU test suites start, stop and restart.

They need the ``dev`` extra (``openai``, ``transformers``, ``tokenizers``) and run from a checkout:
``python -m`` from the repository's root, pytest (``pythonpath`` in pyproject.toml) and the
scripts under ``bench/`` put that root on ``sys.path``.
"""
