"""asl-oracle reference: a readable NumPy transformer that defines ASL's semantics."""

from reference.errors import OracleError

__all__ = ["OracleError"]
