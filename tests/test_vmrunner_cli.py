"""scripts/vm.py's defaults and the QEMU version check of scripts/vmrunner/qemu.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import vm
from vmrunner.backend import backend_spec
from vmrunner.errors import HarnessError
from vmrunner.qemu import check_qemu_version, find_qemu, parse_qemu_version
from vmrunner.session import SessionOptions

QEMU_10 = ("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n"
           "Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n")
QEMU_7 = ("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u16)\n"
          "Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n")


@pytest.mark.parametrize(("text", "version"), [
    (QEMU_10, (10, 0, 2)),
    (QEMU_7, (7, 2, 19)),
    ("QEMU emulator version 8.0.0\n", (8, 0, 0)),
    ("QEMU emulator version 9.2 (v9.2-dirty)\n", (9, 2, 0)),
])
def test_parse_qemu_version(text: str, version: tuple[int, int, int]) -> None:
    assert parse_qemu_version(text) == version


def test_unreadable_qemu_version_is_a_harness_error() -> None:
    with pytest.raises(HarnessError, match="cannot read a QEMU version"):
        parse_qemu_version("qemu-system-x86_64: unknown option\n")


@pytest.mark.parametrize(("version", "ok"), [
    ((7, 2, 19), False), ((7, 99, 0), False), ((8, 0, 0), True), ((10, 0, 2), True),
])
def test_qemu_older_than_8_is_refused_with_the_fix(version: tuple[int, int, int],
                                                   ok: bool) -> None:
    if ok:
        check_qemu_version("/usr/bin/qemu-system-x86_64", version)
        return
    with pytest.raises(HarnessError, match=r"needs QEMU >= 8\.0") as error:
        check_qemu_version("/usr/bin/qemu-system-x86_64", version)
    assert "scripts/setup-host.sh" in str(error.value)
    assert ".".join(map(str, version)) in str(error.value)


def _fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> Path:
    qemu = tmp_path / "qemu-system-x86_64"
    qemu.write_text(f"#!/bin/sh\n{body}\n")
    qemu.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    return qemu


def test_find_qemu_runs_the_binary_on_path(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    qemu = _fake_qemu(tmp_path, monkeypatch, f"printf '%s' '{QEMU_10}'")
    assert find_qemu() == str(qemu)


def test_find_qemu_refuses_debian_12s_qemu(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    qemu = _fake_qemu(tmp_path, monkeypatch, f"printf '%s' '{QEMU_7}'")
    with pytest.raises(HarnessError, match=r"is QEMU 7\.2\.19.*scripts/setup-host\.sh") as error:
        find_qemu()
    assert str(qemu) in str(error.value)


def test_find_qemu_reports_a_failing_binary(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_qemu(tmp_path, monkeypatch, "echo 'libfoo.so: cannot open' >&2; exit 127")
    with pytest.raises(HarnessError, match=r"exited with status 127: libfoo\.so: cannot open"):
        find_qemu()


def test_find_qemu_without_qemu_names_the_setup_script(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(HarnessError, match=r"not found: run scripts/setup-host\.sh"):
        find_qemu()


def _options(*argv: str) -> SessionOptions:
    args = vm.build_parser().parse_args(list(argv))
    return vm._options(args, {"console-check": "console"}.get(args.command, args.command))


def test_every_command_tests_our_backend_by_default() -> None:
    for command in ("test", "console-check", "demo"):
        assert _options(command).backend == backend_spec("ours", None), command
    assert _options("test", "--backend", "reference").backend.name == "reference"
    assert _options("test", "--backend-cmd", "x --socket-path {socket}").backend.name == \
        "custom"


def test_test_has_the_userspace_gpu_unless_told_otherwise() -> None:
    assert _options("test").second_gpu
    assert _options("test", "--second-gpu").second_gpu
    assert not _options("test", "--no-second-gpu").second_gpu
    assert _options("demo").second_gpu
    assert not _options("console-check").second_gpu


def test_the_gpu_device_option_reaches_the_session() -> None:
    assert _options("test").gpu_device == "vhost-user-gpu-pci"
    for command in ("test", "demo", "console-check"):
        assert _options(command, "--gpu-device", "vhost-user-vga").gpu_device == \
            "vhost-user-vga"
    with pytest.raises(SystemExit):
        _options("test", "--gpu-device", "virtio-gpu-pci")


def test_the_heads_option_reaches_the_session() -> None:
    assert _options("test").heads == 1
    assert _options("console-check", "--heads", "2").heads == 2
    for bad in ("0", "17"):
        with pytest.raises(SystemExit):
            _options("test", "--heads", bad)


def test_time_limits_are_bounded_by_default() -> None:
    test = _options("test")
    assert test.timeout == vm.DEFAULT_TIMEOUT <= 900
    assert 0 < test.per_test_timeout < test.timeout
    assert test.boot_timeout < test.timeout
    assert _options("console-check").timeout == vm.DEFAULT_TIMEOUT
    assert _options("console-check").per_test_timeout == 0  # no pytest there
    assert _options("demo").timeout == vm.DEMO_TIMEOUT
    assert _options("test", "--timeout", "60", "--per-test-timeout", "0").timeout == 60
    assert _options("test", "--per-test-timeout", "0").per_test_timeout == 0


@pytest.mark.parametrize("argv", [
    ("console-check", "--memory", "-5"), ("test", "--smp", "0"),
    ("test", "--hugepages", "-1"), ("test", "--timeout", "0"),
    ("test", "--boot-timeout", "inf"), ("test", "--shutdown-timeout", "nan"),
    ("test", "--per-test-timeout", "-1"), ("demo", "--size-mib", "0"),
    ("demo", "--matmul", "-3"), ("demo", "--saxpy-rounds", "x"),
    ("test", "--backend-cmd", "python3 -m vgpu_backend"),  # no {socket}
])
def test_nonsense_values_are_usage_errors(argv: tuple[str, ...],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Refused with exit 2 and the option named, before anything starts (a negative
    --memory used to reach QEMU and end as a harness error)."""
    with pytest.raises(SystemExit) as info:
        _options(*argv)
    assert info.value.code == 2
    assert f"argument {argv[1]}: " in capsys.readouterr().err
    assert _options("test", "--hugepages", "0").hugepages == 0


def test_test_sh_bounds_every_vm_step() -> None:
    script = (Path(__file__).resolve().parents[1] / "scripts" / "test.sh").read_text()
    vm_lines = [line for line in script.replace("\\\n", " ").splitlines()
                if "scripts/vm.py" in line]
    assert len(vm_lines) >= 3
    for line in vm_lines:
        assert "--timeout" in line.split(" -- ")[0] and "--backend" in line, line
        if " test " in line:  # each says whether the userspace-driver GPU is there
            assert "--second-gpu" in line or "--no-second-gpu" in line, line


def test_backend_args_go_after_the_preset_and_keep_its_name() -> None:
    spec = _options("test", "--backend-arg=--poll-max-us=500",
                    "--backend-arg=--log-level=debug", "--heads", "2").backend
    assert spec.name == "ours"
    argv = spec.argv(Path("/s"), heads=2)
    assert argv[-4:] == ["--poll-max-us=500", "--log-level=debug", "--max-outputs", "2"]
    assert argv[:-4] == backend_spec("ours", None).argv(Path("/s"))


def test_backend_args_do_not_go_with_a_backend_command(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        vm.main(["test", "--backend-cmd", "x --socket-path {socket}",
                 "--backend-arg=--poll-max-us=1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "vm.py test: error: --backend-arg goes with a preset" in err
    with pytest.raises(HarnessError, match="--backend-arg goes with a preset"):
        backend_spec(None, "x --socket-path {socket}", ["--log-level=debug"])


@pytest.mark.parametrize("command", ["demo", "console-check", "artifacts"])
def test_extra_arguments_are_refused_with_the_commands_usage(
        command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        vm.main([command, "--", "-k", "x"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: vm.py {command}" in err
    assert f"vm.py {command}: error: only `test` takes extra pytest arguments" in err
