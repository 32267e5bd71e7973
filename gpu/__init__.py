"""gpu: the CuPy port of the reference semantics (issue 4; not built yet).

Importing this package never requires CuPy.
"""
