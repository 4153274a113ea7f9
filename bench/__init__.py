"""The benchmark suite (issue 6): each figure beside a bare baseline in the same run.

Run it with ``python -m bench`` (see bench/README.md). It is not part of the
unit tests: it starts servers on 127.0.0.1, creates and drops its own
databases, and takes minutes.
"""
