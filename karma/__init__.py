"""KARMA: kinship-aware preference mapping and the MAP alignment-potential metric."""

__version__ = "0.1.0"
