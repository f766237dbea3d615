"""The demos: small end-to-end runs on data the code generates or ships, on a CPU in minutes.

Each demo is a module with a typed function that trains (or reuses) its runs through the library and returns
what it writes to ``results.json``, and a function that formats that as a table; :mod:`vitssl.demos.main` is the
command line that parses, calls one of them and prints (``python -m vitssl.demo``, ``make demo``). Demos call the
library, never :mod:`vitssl.cli`.

- :mod:`~vitssl.demos.pretrain`: MoCo v3 on scikit-learn's digits, k-NN and linear probes against raw pixels and
  the random initialisation (``make demo``).
- :mod:`~vitssl.demos.action`: action recognition on procedural motion clips, mean head against temporal head.
- :mod:`~vitssl.demos.tca`: near-duplicate video retrieval with TCA against frame-mean and thumbnail baselines.
- :mod:`~vitssl.demos.track`: TransTrack against the IoU-association baseline on generated sequences.

Importing this package imports none of them (nor torch).
"""
