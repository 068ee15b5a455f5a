"""Data sets. Built-in ones come from scikit-learn's bundled copies (no download)."""
from .builtin import load_breast_cancer, load_digits, standardise

__all__ = ["load_breast_cancer", "load_digits", "standardise"]
