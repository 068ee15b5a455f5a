"""The run's closing summary of skip reasons (tests/conftest.py)."""
from types import SimpleNamespace

from conftest import skip_summary


def _skipped(reason):
    # a skip's report as pytest keeps it: longrepr is (path, line, "Skipped: reason")
    return SimpleNamespace(longrepr=("tests/x.py", 1, f"Skipped: {reason}"))


def test_skips_are_grouped_by_reason_most_frequent_first():
    reports = [_skipped("needs a CUDA device")] * 700 + [_skipped("needs two devices")] * 8
    reports += [SimpleNamespace(longrepr="Skipped: triton not installed")]
    assert skip_summary(reports) == ["709 skipped, by reason",
                                     "  700  needs a CUDA device",
                                     "    8  needs two devices",
                                     "    1  triton not installed"]


def test_a_long_reason_is_cut_to_the_width_and_no_skips_print_nothing():
    lines = skip_summary([_skipped("x" * 200)], width=40)
    assert len(lines[1]) == 40 and lines[1].endswith(" ...")
    assert skip_summary([]) == []
