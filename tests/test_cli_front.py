"""What a user sees first: ``pbrf-fast --help`` without torch, the commands in their
groups, every option's help with its default, and the backends summary."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pbrf_fast import cli
from pbrf_fast.backends import SUMMARY_WIDTH, format_backends

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter on this source tree; its stdout."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_top_level_help_imports_neither_torch_nor_the_library():
    # what `python -m pbrf_fast --help` runs, then the modules it loaded
    loaded = _python(
        "import sys, contextlib, io\n"
        "from pbrf_fast import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        cli.main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(' '.join(sorted(sys.modules)))\n").split()
    assert "torch" not in loaded
    heavy = [m for m in loaded if m.startswith("pbrf_fast.") and m not in ("pbrf_fast.cli", "pbrf_fast.errors")]
    assert not heavy, heavy


def test_python_m_help_lists_the_users_commands_before_the_papers():
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "pbrf_fast", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # -X importtime writes one line per imported module to stderr
    assert not [line for line in done.stderr.splitlines() if line.rstrip().endswith("| torch")]
    text = done.stdout
    order = [text.index(f"\n  {c.name} ") for c in cli.COMMANDS]
    assert order == sorted(order)
    assert text.index("your model and data:") < text.index("scores") < text.index("the paper's experiments:")
    assert max(len(line) for line in text.splitlines()) <= 80


@pytest.mark.parametrize("name", [c.name for c in cli.COMMANDS])
def test_every_option_of_every_command_has_help_and_shows_its_default(name):
    parser = cli.command_parser(name)
    text = parser.format_help()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{name} {action.option_strings[0]} has no help"
        default = action.default
        if default is None or default is False or default in ([], ()) or isinstance(default, str) and not default:
            continue
        # a set default is shown ("default: X") unless the help says what it is in its own words
        help_text = cli._Help(name)._get_help_string(action)
        assert "default" in help_text or "unset" in help_text, (name, action.option_strings[0])
    assert "(default: " in text or name == "show"


def test_a_subcommand_adds_its_options_only_when_used():
    parser = cli.build_parser()
    demo = parser._subparsers._group_actions[0].choices["demo"]
    assert [a.dest for a in demo._actions] == ["help"]  # nothing added yet
    args = parser.parse_args(["demo", "--seed", "3"])
    assert args.seed == 3 and args.func is cli._cmd_demo
    assert cli.build_parser().parse_args(["reproduce", "table2", "--list"]).target == "table2"


def test_backends_prints_a_summary_and_json_on_request(capsys):
    assert cli.main(["backends"]) == 0
    summary = capsys.readouterr().out
    assert summary.splitlines()[0].startswith("pbrf_fast backends")
    assert max(len(line) for line in summary.splitlines()) <= SUMMARY_WIDTH
    assert cli.main(["backends", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"torch", "cpu", "cuda", "triton"}


def test_the_summary_of_a_cpu_only_machine_has_no_error_text():
    # what a machine with nvcc but no GPU driver reports (the CUDA module builds, then finds no device)
    report = {
        "torch": {"available": True, "reason": "pure-torch reference (torch 2.13.0+cpu)"},
        "cpu": {"available": True, "reason": "OpenMP kernels in pbrf_fast._C"},
        "cuda": {"available": False, "reason": "pbrf_fast._C_cuda built, but no CUDA device (cudaErrorInsufficient"
                                               "Driver: CUDA driver version is insufficient for CUDA runtime version)"},
        "triton": {"available": False, "reason": "triton 3.8.0 imported, but no CUDA device for torch; set "
                                                 "TRITON_INTERPRET=1 before import to run it on CPU tensors"},
    }
    text = format_backends(report)
    assert "Error" not in text and "insufficient" not in text
    assert "cuda    no      compiled, no GPU driver on this machine" in text
    assert text.splitlines()[-1] == "In use: the compiled CPU kernels."
    assert max(len(line) for line in text.splitlines()) <= SUMMARY_WIDTH
    # a module that should load and did not keeps its reason, cut to the width
    broken = dict(report, cpu={"available": False, "reason": "import pbrf_fast._C failed: ImportError: " + "x" * 300})
    lines = format_backends(broken).splitlines()
    assert any("failed to load: import pbrf_fast._C failed" in line for line in lines)
    assert max(map(len, lines)) <= SUMMARY_WIDTH
    assert lines[-1] == "In use: pure torch only (slower: no compiled kernels loaded)."
    no_toolkit = dict(report, cuda={"available": False, "reason": "import pbrf_fast._C_cuda failed: "
                                                                  "ModuleNotFoundError: No module named 'x'"})
    assert "not compiled" in format_backends(no_toolkit)


def test_a_warning_during_a_command_is_one_plain_line():
    # in a fresh interpreter: pytest records warnings instead of printing them
    done = subprocess.run(
        [sys.executable, "-c",
         "import warnings\n"
         "from pbrf_fast import cli\n"
         "cli._cmd_demo = lambda args: warnings.warn('lissa: 3 of 3 columns did not reach tol') or 0\n"
         "assert cli.main(['demo']) == 0\n"
         "assert 'pbrf-fast' not in warnings.formatwarning('x', UserWarning, 'f.py', 1)  # put back\n"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "pbrf-fast demo: UserWarning: lissa: 3 of 3 columns did not reach tol\n"


def test_import_pbrf_fast_is_lazy_and_every_public_name_resolves():
    out = _python(
        "import sys\n"
        "import pbrf_fast\n"
        "print('torch' in sys.modules)\n"
        "import pbrf_fast.backends, pbrf_fast.explain  # the submodules named like public functions\n"
        "print(callable(pbrf_fast.backends), callable(pbrf_fast.explain))\n"
        "print(all(getattr(pbrf_fast, name) is not None for name in pbrf_fast.__all__))\n"
        "from pbrf_fast import Influence, solve\n"
        "print(Influence.__module__, solve.__module__)\n")
    assert out.split("\n")[:4] == ["False", "True True", "True", "pbrf_fast.influence pbrf_fast.inverses"]
