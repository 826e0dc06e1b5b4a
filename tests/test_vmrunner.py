"""Host-side tests of the VM runner's pure parts (scripts/vmrunner); no VM is booted."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from vmrunner import commands, console_check
from vmrunner.backend import REPO_ROOT, BackendSpec, backend_spec, is_listening, start_backend
from vmrunner.control import ControlServer, GuestEvent, parse_event
from vmrunner.errors import HarnessError
from vmrunner.junit import read_junit, summarize
from vmrunner.processes import ManagedProcess, tail
from vmrunner.qemu import CONTROL_PORT_NAME, Share, VmLayout, kernel_cmdline, qemu_command
from vmrunner.screendump import parse_ppm
from vmrunner.session import VmSession

from tests.test_vmrunner_screencheck import FakeDumper

GEOMETRY = {"xres": 640, "yres": 480, "stride": 2560, "bpp": 32, "rows": 30, "cols": 80,
            "x0": 352, "y0": 384}


def _render_console(seed: int = 7, font_alias: dict[str, str] | None = None) -> np.ndarray:
    """What a correct display shows: fake 8x16 glyphs in the palette colours + the pattern
    (a broken font draws each key of `font_alias` with the glyph of its value)."""
    rng = np.random.default_rng(seed)
    glyphs: dict[str, np.ndarray] = {" ": np.zeros((16, 8), bool)}
    image = np.zeros((GEOMETRY["yres"], GEOMETRY["xres"], 3), np.uint8)
    for line in console_check.CONSOLE_LINES:
        for col, written in enumerate(line.text):
            char = (font_alias or {}).get(written, written)
            if char not in glyphs:
                mask = rng.random((16, 8)) < 0.4
                mask[0, 0] = True
                mask[15, 7] = False
                glyphs[char] = mask
            cell = np.where(glyphs[char][..., None], np.array(line.fg, np.uint8),
                            np.array(line.bg, np.uint8))
            image[line.row * 16:(line.row + 1) * 16, col * 8:(col + 1) * 8] = cell
    x0, y0 = GEOMETRY["x0"], GEOMETRY["y0"]
    pattern = console_check.pattern_rgb()
    image[y0:y0 + pattern.shape[0], x0:x0 + pattern.shape[1]] = pattern
    return image


def test_console_check_accepts_the_expected_screen() -> None:
    assert console_check.check_console(_render_console(), GEOMETRY) == []


@pytest.mark.parametrize("corruption", ["blank", "shifted", "channels swapped", "cropped"])
def test_console_check_rejects_a_wrong_screen(corruption: str) -> None:
    good = _render_console()
    bad = {"blank": np.zeros_like(good), "shifted": np.roll(good, 1, axis=1),
           "channels swapped": good[..., ::-1], "cropped": good[:, :320]}[corruption]
    assert console_check.check_console(np.ascontiguousarray(bad), GEOMETRY)


def test_console_check_rejects_stray_pixels_and_swapped_glyphs() -> None:
    stray = _render_console()
    stray[200, 300] = (1, 2, 3)
    assert any("non-black" in f for f in console_check.check_console(stray, GEOMETRY))
    swapped = _render_console()
    swapped[0:16, 8:16] = swapped[0:16, 0:8]  # 'g' drawn as 'v'
    assert any("glyph" in f for f in console_check.check_console(swapped, GEOMETRY))
    damaged = _render_console()
    cell = damaged[32:48, 32:40]  # row 2 col 4: the last 'A' of "AABBA"
    y, x = np.argwhere((cell != console_check.BRIGHT_YELLOW).any(axis=2))[0]
    cell[y, x] = console_check.BRIGHT_YELLOW  # one more foreground pixel: still two colours
    assert console_check.check_console(damaged, GEOMETRY) == [
        "text cell row 2 col 4 'A': glyph differs from the same character at row 2 col 0"]


def test_console_check_rejects_a_font_that_draws_two_characters_alike() -> None:
    same = _render_console(font_alias={"Z": "Y"})  # every Z drawn as Y: each is consistent
    assert console_check.check_console(same, GEOMETRY) == [
        "text: characters 'Y' and 'Z' have identical glyphs"]


def test_console_check_needs_a_32_bpp_framebuffer_and_a_full_report() -> None:
    failures = console_check.check_console(_render_console(), {**GEOMETRY, "bpp": 16})
    assert failures == ["guest framebuffer has 16 bpp, the check expects 32"]
    report = {key: str(value) for key, value in GEOMETRY.items() if key != "stride"}
    with pytest.raises(ValueError, match="console-ready lacks stride"):
        console_check.parse_geometry(report)
    assert console_check.parse_geometry({**report, "stride": "2560"}) == GEOMETRY


def test_pattern_bytes_are_bgrx_of_the_rgb_pattern() -> None:
    rgb = console_check.pattern_rgb()
    bgrx = np.frombuffer(console_check.pattern_bgrx(), np.uint8).reshape(*rgb.shape[:2], 4)
    assert np.array_equal(bgrx[..., 2::-1], rgb)
    assert len({tuple(p) for p in rgb.reshape(-1, 3)}) == rgb.shape[0] * rgb.shape[1]
    assert rgb.reshape(-1, 3).any(axis=1).all()


def test_console_tty_bytes_position_every_line() -> None:
    text = console_check.console_tty_bytes().decode()
    for line in console_check.CONSOLE_LINES:
        assert f"\x1b[{line.row + 1};1H\x1b[{line.sgr}m{line.text}" in text


def test_parse_ppm_round_trip_and_truncation() -> None:
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    data = b"P6\n3 2\n255\n" + pixels.tobytes()
    assert np.array_equal(parse_ppm(data), pixels)
    with pytest.raises(ValueError):
        parse_ppm(data[:-1])
    with pytest.raises(ValueError):
        parse_ppm(b"P5\n3 2\n255\n" + bytes(6))
    with pytest.raises(ValueError, match="maxval 255"):  # 16-bit samples
        parse_ppm(b"P6\n3 2\n65535\n" + bytes(36))


def test_qemu_command_places_devices_at_fixed_addresses(tmp_path: Path) -> None:
    layout = VmLayout(
        kernel_image=tmp_path / "vmlinux", initramfs=tmp_path / "initrd",
        cmdline=kernel_cmdline("test", "host", "0000:00:0a.0", 64),
        gpu_sockets=(tmp_path / "a.sock", tmp_path / "b.sock"),
        control_socket=tmp_path / "c.sock", qmp_socket=tmp_path / "q.sock",
        serial_log=tmp_path / "serial.log",
        shares=(Share("results", tmp_path, readonly=False), Share("hostroot", Path("/"), True)))
    argv = " ".join(qemu_command(layout))
    assert "memory-backend-memfd,id=mem,size=2048M,share=on" in argv
    assert "vhost-user-gpu-pci,chardev=vgpu0,id=gpu0,addr=02.0" in argv
    assert "vhost-user-gpu-pci,chardev=vgpu1,id=gpu1,addr=0a.0" in argv
    assert "path=/,security_model=none,readonly=on,multidevs=remap" in argv
    assert "hugepages=64" in argv and "vgpu.userspace_pci=0000:00:0a.0" in argv
    assert "hugetlb" not in argv
    huge = " ".join(qemu_command(dataclasses.replace(layout, host_hugetlb=True)))
    assert "memory-backend-memfd,id=mem,size=2048M,share=on,hugetlb=on,hugetlbsize=2M" in huge
    vga = qemu_command(dataclasses.replace(layout, gpu_device="vhost-user-vga", heads=2))
    assert "vhost-user-vga,chardev=vgpu0,id=gpu0,addr=02.0,max_outputs=2" in vga
    assert "vhost-user-gpu-pci,chardev=vgpu1,id=gpu1,addr=0a.0" in vga  # the userspace one


def test_only_our_back_end_is_told_the_heads() -> None:
    """QEMU's C back-end takes its outputs from QEMU; ours needs --max-outputs."""
    assert backend_spec("ours", None).argv(Path("/s"), heads=2)[-2:] == ["--max-outputs", "2"]
    assert "--max-outputs" not in backend_spec("ours", None).argv(Path("/s"))
    assert "--max-outputs" not in backend_spec("reference", None).argv(Path("/s"), heads=2)


def test_backend_spec_templates() -> None:
    spec = backend_spec(None, "prog --socket-path {socket} --log-level debug")
    assert spec.name == "custom"
    assert spec.argv(Path("/s")) == ["prog", "--socket-path", "/s", "--log-level", "debug"]
    assert spec.cwd == REPO_ROOT  # so `python3 -m vgpu_backend ...` finds the package
    assert backend_spec("reference", None).argv(Path("/s"))[-2:] == ["--socket-path", "/s"]
    assert backend_spec(None, None).name == "ours"  # the runner tests this project's back-end
    with pytest.raises(HarnessError):
        backend_spec(None, "prog --no-socket")
    with pytest.raises(HarnessError):
        backend_spec("nonsense", None)


LISTENER = ("import os, socket, sys; server = socket.socket(socket.AF_UNIX); "
            "server.bind(sys.argv[1]); server.listen(1); print(os.getcwd(), flush=True); "
            "server.accept()")


def test_a_backend_starts_in_its_directory_and_is_up_once_it_listens(tmp_path: Path) -> None:
    workdir = tmp_path / "wd"
    workdir.mkdir()
    spec = BackendSpec("custom", (sys.executable, "-c", LISTENER, "{socket}"), workdir)
    sock, log = tmp_path / "gpu0.sock", tmp_path / "backend-0.log"
    sock.write_bytes(b"")  # a stale socket file from an earlier run is replaced

    async def scenario() -> bool:
        process = await start_backend(spec, 0, sock, log, 5.0)
        listening = is_listening(sock)
        await process.stop(0, term_wait=3)
        return listening

    assert asyncio.run(scenario())
    assert log.read_text().splitlines()[0] == str(workdir)


def test_is_listening_sees_listen_not_bind(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        assert not is_listening(path)
        server.listen(1)
        assert is_listening(path)


def test_parse_event() -> None:
    event = parse_event("init start=1.5 modules=2.0 now=2.1")
    assert (event.name, event.fields["modules"]) == ("init", "2.0")
    assert parse_event("error cannot mount /dev/vda").text == "cannot mount /dev/vda"
    assert parse_event("error mount -o x=1 --opt=2 failed").fields == {"x": "1"}


def test_control_server_queues_events_and_answers_requests(tmp_path: Path) -> None:
    async def scenario() -> tuple[GuestEvent, bytes]:
        events: asyncio.Queue[GuestEvent] = asyncio.Queue()
        server = ControlServer(tmp_path / "c.sock", events, tmp_path / "control.log")

        async def echo(args: str) -> str:
            return f"ok {args.upper()}"

        async def two_lines(args: str) -> str:
            return "ok first\nsecond"

        async def broken(args: str) -> str:
            raise KeyError(args)

        server.handlers["echo"] = echo
        await server.start()
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "c.sock"))
        server.handlers["two-lines"] = two_lines
        server.handlers["broken"] = broken
        writer.write(b"event init now=1\n\necho abc\nbogus\ntwo-lines\nbroken x\necho z\n")
        replies = b"".join([await reader.readline() for _ in range(5)])
        event = await asyncio.wait_for(events.get(), 5)
        writer.close()
        await server.close()
        return event, replies

    event, replies = asyncio.run(scenario())
    assert event.name == "init" and event.fields == {"now": "1"}
    assert replies == (b"ok ABC\nerror unknown request bogus\nok first second\n"
                       b"error KeyError: 'x'\nok Z\n")


def test_closing_the_control_server_drops_the_guests_connection(tmp_path: Path) -> None:
    async def scenario() -> bytes:
        events: asyncio.Queue[GuestEvent] = asyncio.Queue()
        server = ControlServer(tmp_path / "c.sock", events, tmp_path / "control.log")
        await server.start()
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "c.sock"))
        writer.write(b"event init\n")
        await asyncio.wait_for(events.get(), 5)
        await server.close()
        rest = await asyncio.wait_for(reader.read(), 2)
        writer.close()
        return rest

    assert asyncio.run(scenario()) == b""
    assert not (tmp_path / "c.sock").exists()


def test_junit_summary(tmp_path: Path) -> None:
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="guest_tests.test_a" name="test_ok" time="0.5"/>'
        '<testcase classname="guest_tests.test_a" name="test_bad" time="1">'
        '<failure message="AssertionError: 3 pixels differ">trace</failure></testcase>'
        '<testcase classname="guest_tests.test_a" name="test_skip" time="0">'
        '<skipped message="no --second-gpu"/></testcase>'
        '</testsuite></testsuites>')
    cases = read_junit(xml)
    assert [c.outcome for c in cases] == ["passed", "failed", "skipped"]
    text = summarize(cases)
    assert "guest_tests.test_a::test_bad" in text and "3 pixels differ" in text
    assert "\n           no --second-gpu\n" in text
    assert text.splitlines()[-1] == "guest: 1 passed, 1 failed, 1 skipped"


def test_junit_summary_counts_errors(tmp_path: Path) -> None:
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="" name="test_fixture" time="0.1">'
        '<error message="fixture \'gpu\' failed">trace</error></testcase>'
        '</testsuite></testsuites>')
    cases = read_junit(xml)
    assert [(c.name, c.outcome, c.message) for c in cases] == [
        ("test_fixture", "error", "fixture 'gpu' failed")]
    assert summarize(cases).splitlines()[-1] == "guest: 0 passed, 0 failed, 1 error"


def _argv_pairs(argv: list[str]) -> list[tuple[str, str]]:
    return [(flag, value) for flag, value in itertools.pairwise(argv[1:])
            if flag.startswith("-")]


def test_qemu_command_boots_the_layout_it_is_given(tmp_path: Path) -> None:
    layout = VmLayout(
        kernel_image=tmp_path / "vmlinux", initramfs=tmp_path / "initrd",
        cmdline=kernel_cmdline("test", "image", None, 32),
        gpu_sockets=(tmp_path / "a.sock",), control_socket=tmp_path / "c.sock",
        qmp_socket=tmp_path / "q.sock", serial_log=tmp_path / "serial.log",
        shares=(Share("results", tmp_path / "results", readonly=False),
                Share("project", tmp_path / "project", readonly=True)),
        root_image=tmp_path / "root.ext4", memory_mib=1536, smp=2)
    argv = qemu_command(layout, "/opt/qemu")
    pairs = _argv_pairs(argv)
    assert argv[0] == "/opt/qemu" and "-no-reboot" in argv
    for pair in [("-kernel", str(tmp_path / "vmlinux")), ("-initrd", str(tmp_path / "initrd")),
                 ("-smp", "2"), ("-m", "1536M,slots=2,maxmem=2560M"), ("-numa", "node,memdev=mem"),
                 ("-append", "console=ttyS0 panic=-1 quiet loglevel=4 hugepages=32 "
                             "vgpu.mode=test vgpu.root=image"),
                 ("-chardev", f"file,id=serial0,path={tmp_path / 'serial.log'}"),
                 ("-fsdev", f"local,id=fs-results,path={tmp_path / 'results'},"
                            "security_model=none"),
                 ("-device", "virtio-9p-pci,fsdev=fs-results,mount_tag=results,addr=04.0"),
                 ("-device", "virtio-9p-pci,fsdev=fs-project,mount_tag=project,addr=05.0"),
                 ("-drive", f"file={tmp_path / 'root.ext4'},if=none,id=root,format=raw,"
                            "readonly=on"),
                 ("-device", "virtio-blk-pci,drive=root,addr=06.0")]:
        assert pair in pairs, pair
    addresses = [match for _, value in pairs for match in re.findall(r",addr=([^,]+)", value)]
    assert len(addresses) == len(set(addresses)) == 5  # control, gpu, 2 shares, root disk
    assert "-drive" not in qemu_command(dataclasses.replace(layout, root_image=None))
    assert kernel_cmdline("demo", "host", None, 0, "vgpu.trace=1") == \
        "console=ttyS0 panic=-1 quiet loglevel=4 hugepages=0 vgpu.mode=demo vgpu.root=host " \
        "vgpu.trace=1"


def test_the_control_port_name_is_the_one_the_guest_init_looks_for() -> None:
    init = (Path(__file__).resolve().parents[1] / "guest_tests" / "boot" / "init").read_text()
    assert f"\nCONTROL_PORT_NAME={CONTROL_PORT_NAME}\n" in init
    layout = VmLayout(Path("k"), Path("i"), "", (), Path("c"), Path("q"), Path("s"))
    assert ("-device", f"virtserialport,bus=vserial.0,chardev=control,name={CONTROL_PORT_NAME}"
            ) in _argv_pairs(qemu_command(layout))


def test_tail_gives_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text("".join(f"line {n} {'x' * 60}\n" for n in range(100)))
    text = tail(log, 5)
    assert text.splitlines() == [f"line {n} {'x' * 60}" for n in range(95, 100)]
    assert len(tail(log).splitlines()) == 40
    assert tail(tmp_path / "missing") == ""


def test_stop_asks_with_sigterm_before_sigkill(tmp_path: Path) -> None:
    script = "trap 'echo bye; exit 0' TERM; echo up; while :; do sleep 0.05; done"

    async def scenario() -> tuple[int | None, str, str]:
        process = ManagedProcess("child", ["sh", "-c", script], tmp_path / "child.log")
        await process.spawn()
        while "up" not in (tmp_path / "child.log").read_text():
            await asyncio.sleep(0.01)
        code = await process.stop(0.05, term_wait=3)
        return code, process.describe_exit(), process.stopped_by

    code, how, by = asyncio.run(scenario())
    assert (code, by) == (0, "SIGTERM")
    assert how == "child exited with status 0 (after SIGTERM)"
    assert "bye" in (tmp_path / "child.log").read_text()


def test_stop_ends_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild"

    async def scenario() -> str:
        process = ManagedProcess("parent", ["sh", "-c", f"sleep 30 & echo $! > {pid_file}; wait"],
                                 tmp_path / "parent.log")
        await process.spawn()
        while not pid_file.exists() or not pid_file.read_text().strip():
            await asyncio.sleep(0.01)
        await process.stop(0, term_wait=3)
        return process.describe_exit()

    assert asyncio.run(scenario()) == "parent was killed by SIGTERM (after SIGTERM)"
    grandchild = int(pid_file.read_text())
    for _ in range(100):  # dead (maybe a zombie nobody reaps) shortly after the SIGTERM
        try:
            state = Path(f"/proc/{grandchild}/stat").read_text().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            break
        if state in ("Z", "X"):
            break
        time.sleep(0.01)
    else:
        os.kill(grandchild, signal.SIGKILL)
        pytest.fail("the grandchild survived stop()")


def _judge(tmp_path: Path, screens: list[np.ndarray]) -> commands.ConsoleJudge:
    dumper = FakeDumper(tmp_path, screens)
    return commands.ConsoleJudge(cast(VmSession, SimpleNamespace(screendumper=dumper)),
                                 tmp_path / "out" / "console.png")


REPORT = " ".join(f"{key}={value}" for key, value in GEOMETRY.items())


def test_the_console_judge_waits_for_the_display(tmp_path: Path) -> None:
    judge = _judge(tmp_path, [np.zeros_like(_render_console()), _render_console()])
    assert asyncio.run(judge.handle(REPORT)) == "ok pass"
    assert (judge.failures, judge.attempts) == ([], 2)
    assert (tmp_path / "out" / "console.png").read_bytes() == b"PNG of the last screen"


def test_the_console_judge_fails_a_wrong_screen_when_time_is_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commands, "CONSOLE_SETTLE_TIMEOUT", 0.0)
    judge = _judge(tmp_path, [np.zeros_like(_render_console())])
    reply = asyncio.run(judge.handle(REPORT))
    assert judge.failures and reply == f"ok fail {len(judge.failures)}"
    assert judge.attempts == 1
    bad = _judge(tmp_path, [_render_console()])
    assert asyncio.run(bad.handle("xres=640")).startswith("error console-ready lacks yres")
    assert bad.failures and bad.attempts == 0
