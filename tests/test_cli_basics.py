"""The CLI contract: --help everywhere, user mistakes are one line on stderr with exit code 2."""

import subprocess
import sys
from pathlib import Path

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


@pytest.mark.parametrize("argv", [
    ["data", "download", "roxford5k", "--root", "{tmp}", "--timeout", "inf"],
    ["data", "download", "roxford5k", "--root", "{tmp}", "--timeout", "nan"],
    ["data", "synth", "--root", "{tmp}/s", "--preset", "tiny", "--seed", "-1"],
    ["train", "--config", "tiny-student-contrplus-asym", "--max-failures", "-5"],
    ["train", "--config", "tiny-student-contrplus-asym", "--image-every", "-3"],
])
def test_out_of_range_flags_are_one_line_exit_2(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([arg.format(tmp=tmp_path) for arg in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must be" in err


def test_a_malformed_base_url_is_one_line_exit_2(tmp_path, capsys):
    assert main(["data", "download", "roxford5k", "--root", str(tmp_path), "--base-url", "http://[::1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--base-url must look like" in err


def test_an_operating_system_error_is_one_line_naming_the_path(tmp_path, monkeypatch, capsys):
    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/ro/out")

    monkeypatch.setattr("amldist.cli.data_synth.generate", read_only)
    assert main(["data", "synth", "--root", str(tmp_path / "s"), "--preset", "tiny"]) == 2
    assert capsys.readouterr().err == "amldist: error: /ro/out: Permission denied\n"


def test_no_module_outside_cli_imports_a_command():
    """The library never imports the application (open_clip's split): every `import amldist.cli...` or
    `from amldist.cli... import` of the package sits in amldist/cli/ itself."""
    import ast

    import amldist

    package = Path(amldist.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path.relative_to(package).parts[0] == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            if any(name == "amldist.cli" or name.startswith("amldist.cli.") for name in names):
                offenders.append(f"{path.relative_to(package)}:{node.lineno}")
    assert len(list(package.rglob("*.py"))) > 50  # the walk saw the package
    assert not offenders, offenders


def test_the_run_summary_counts_epochs_from_one_as_the_progress_lines_do(tmp_path, capsys):
    from types import SimpleNamespace

    from amldist.cli.train import print_summary

    value = {"best_score": 37.56, "best_epoch": 1, "best_metric": "val_map_sym"}
    result = SimpleNamespace(return_value=value, checkpoint=None)
    print_summary(result, tmp_path, "off")
    assert "best val_map_sym: 37.56 at epoch 2 " in capsys.readouterr().out
