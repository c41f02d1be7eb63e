"""The CLI contract: --help everywhere, user mistakes are one line on stderr with exit code 2."""

import subprocess
import sys

import pytest

from amldist.cli.main import main


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "data" in capsys.readouterr().out


def test_unknown_command_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err


def test_console_script_runs_as_module():
    proc = subprocess.run([sys.executable, "-m", "amldist.cli.main", "--version"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0
    assert proc.stdout.startswith("amldist ")
