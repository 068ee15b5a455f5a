"""Data sets: built-in ones from scikit-learn's bundled copies (no download), and
loaders for the standard file formats in a data directory (``$PBRF_DATA``)."""
from .builtin import load_breast_cancer, load_digits, standardise
from .idx import corrupt_labels, load_fashion_mnist, load_mnist, read_idx, subset
from .ptb import load_ptb
from .uci import load_concrete, load_diabetes_pima, load_energy, resolve_data_dir

__all__ = ["load_ptb", "corrupt_labels", "load_fashion_mnist", "load_mnist", "read_idx", "subset", "load_breast_cancer", "load_concrete", "load_diabetes_pima", "load_digits", "load_energy",
           "resolve_data_dir", "standardise"]
