"""Runnable examples. A package so worker processes can import what an example submits
(``python -m examples.async_offload``; the tests import them the same way)."""
