"""Host-side tests of the VM runner's pure parts (scripts/vmrunner); no VM is booted."""

from __future__ import annotations

import asyncio
import dataclasses
import lzma
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from vmrunner import console_check
from vmrunner.backend import backend_spec, is_listening
from vmrunner.control import ControlServer, GuestEvent, parse_event
from vmrunner.errors import HarnessError
from vmrunner.initramfs import CpioEntry, write_newc
from vmrunner.junit import read_junit, summarize
from vmrunner.kernel import extract_vmlinux, modinfo_depends
from vmrunner.qemu import Share, VmLayout, kernel_cmdline, qemu_command
from vmrunner.screendump import parse_ppm

GEOMETRY = {"xres": 640, "yres": 480, "stride": 2560, "bpp": 32, "rows": 30, "cols": 80,
            "x0": 352, "y0": 384}


def _render_console(seed: int = 7) -> np.ndarray:
    """What a correct display shows: fake 8x16 glyphs in the palette colours + the pattern."""
    rng = np.random.default_rng(seed)
    glyphs: dict[str, np.ndarray] = {" ": np.zeros((16, 8), bool)}
    image = np.zeros((GEOMETRY["yres"], GEOMETRY["xres"], 3), np.uint8)
    for line in console_check.CONSOLE_LINES:
        for col, char in enumerate(line.text):
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


def test_extract_vmlinux_finds_the_elf_after_a_false_magic() -> None:
    payload = b"\x7fELF" + bytes(range(256)) * 64
    packed = lzma.compress(payload, format=lzma.FORMAT_XZ)
    bzimage = b"MZ" + bytes(100) + b"\xfd7zXZ\x00garbage" + bytes(50) + packed + bytes(30)
    assert extract_vmlinux(bzimage) == payload
    assert extract_vmlinux(b"MZ" + bytes(100)) is None


def _module_elf(modinfo: bytes) -> bytes:
    """A minimal ELF64 with a section-name table and a .modinfo section."""
    names = b"\0.shstrtab\0.modinfo\0"
    body_offset = 64
    shoff = body_offset + len(names) + len(modinfo)
    header = bytearray(64)
    header[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HHH", header, 0x3A, 64, 3, 1)

    def section(name: int, offset: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, 1, 0, 0, offset, size, 0, 0, 1, 0)

    return (bytes(header) + names + modinfo + bytes(64)
            + section(1, body_offset, len(names))
            + section(11, body_offset + len(names), len(modinfo)))


def test_modinfo_depends() -> None:
    ko = _module_elf(b"license=GPL\0depends=drm,drm_kms_helper\0name=virtio_gpu\0")
    assert modinfo_depends(ko) == ["drm", "drm_kms_helper"]
    assert modinfo_depends(_module_elf(b"depends=\0")) == []
    with pytest.raises(HarnessError):
        modinfo_depends(b"not an elf")


def test_newc_archive_lists_with_cpio(tmp_path: Path) -> None:
    archive = tmp_path / "initrd.cpio"
    write_newc([CpioEntry("bin", stat.S_IFDIR | 0o755),
                CpioEntry("bin/busybox", stat.S_IFREG | 0o755, b"x" * 5),
                CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
                CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))], archive)
    assert archive.stat().st_size % 4 == 0
    listing = subprocess.run(["cpio", "-itv", "--quiet"], stdin=archive.open("rb"),
                             capture_output=True, text=True, check=True).stdout
    assert "bin/sh -> busybox" in listing
    assert "5, " in listing and "dev/console" in listing


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


def test_backend_spec_templates() -> None:
    spec = backend_spec(None, "prog --socket-path {socket} --log-level debug")
    assert spec.name == "custom"
    assert spec.argv(Path("/s")) == ["prog", "--socket-path", "/s", "--log-level", "debug"]
    assert backend_spec("reference", None).argv(Path("/s"))[-2:] == ["--socket-path", "/s"]
    assert backend_spec(None, None).name == "ours"  # the runner tests this project's back-end
    with pytest.raises(HarnessError):
        backend_spec(None, "prog --no-socket")
    with pytest.raises(HarnessError):
        backend_spec("nonsense", None)


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


def test_control_server_queues_events_and_answers_requests(tmp_path: Path) -> None:
    async def scenario() -> tuple[GuestEvent, bytes]:
        events: asyncio.Queue[GuestEvent] = asyncio.Queue()
        server = ControlServer(tmp_path / "c.sock", events, tmp_path / "control.log")

        async def echo(args: str) -> str:
            return f"ok {args.upper()}"

        server.handlers["echo"] = echo
        await server.start()
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "c.sock"))
        writer.write(b"event init now=1\necho abc\nbogus\n")
        replies = await reader.readline() + await reader.readline()
        event = await asyncio.wait_for(events.get(), 5)
        writer.close()
        await server.close()
        return event, replies

    event, replies = asyncio.run(scenario())
    assert event.name == "init" and event.fields == {"now": "1"}
    assert replies == b"ok ABC\nerror unknown request bogus\n"


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
    assert text.splitlines()[-1] == "guest: 1 passed, 1 failed, 1 skipped"
