"""The VM runner's artifact cache (scripts/vmrunner/artifacts.py), with fake builders in a
temporary cache directory: no download, no debootstrap, no VM."""

from __future__ import annotations

import fcntl
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from vmrunner import artifacts, initramfs, kernel, rootfs
from vmrunner.artifacts import _drop_stale, prepare_artifacts, recipe_hash
from vmrunner.errors import HarnessError
from vmrunner.kernel import GuestKernel


@dataclass
class FakeBuilders:
    """Stand-ins for the kernel download, initramfs build and debootstrap; they count calls."""

    cache: Path
    init_script: bytes = b"#!/bin/sh\necho init v1\n"
    release: str = "6.1.0-99-amd64"
    load_order: tuple[str, ...] = ("kernel/a.ko",)
    kernel_keys: list[str] = field(default_factory=list)
    initramfs_builds: list[Path] = field(default_factory=list)
    image_builds: list[Path] = field(default_factory=list)
    fail_image: bool = False

    def fetch_kernel(self, directory: Path, key: str,
                     package: str | None = None) -> tuple[GuestKernel, bool]:
        self.kernel_keys.append(key)
        fetched = key not in self.kernel_keys[:-1]
        unpacked = directory / f"kernel-fake-{key}"
        unpacked.mkdir(exist_ok=True)
        (unpacked / "bzImage").write_bytes(b"MZ")
        return GuestKernel(self.release, "6.1.999-1", unpacked / "bzImage",
                           unpacked / "bzImage", unpacked / "modules", self.load_order), fetched

    def inputs(self) -> dict[str, bytes]:
        return {"init": self.init_script, "bin/busybox": b"\x7fELF busybox"}

    def build_initramfs(self, guest_kernel: GuestKernel, path: Path) -> None:
        self.initramfs_builds.append(path)
        path.write_bytes(b"070701 " + self.init_script)

    def build_image(self, path: Path) -> None:
        if self.fail_image:
            raise HarnessError("debootstrap failed (exit 1)")
        self.image_builds.append(path)
        path.write_bytes(b"ext4")


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeBuilders:
    """A fresh cache directory in VGPU_CACHE_DIR with every builder replaced."""
    builders = FakeBuilders(tmp_path / "cache")
    monkeypatch.setenv("VGPU_CACHE_DIR", str(builders.cache))
    monkeypatch.setattr(kernel, "fetch_kernel", builders.fetch_kernel)
    monkeypatch.setattr(initramfs, "initramfs_inputs", builders.inputs)
    monkeypatch.setattr(initramfs, "build_initramfs", builders.build_initramfs)
    monkeypatch.setattr(rootfs, "build_debian_image", builders.build_image)
    monkeypatch.setattr(rootfs, "check_host_root", lambda: None)
    return builders


def _cached(cache: Path, pattern: str) -> list[str]:
    return sorted(path.name for path in cache.glob(pattern))


def test_recipe_hash_is_stable_and_sees_every_part() -> None:
    base = recipe_hash("bookworm", b"\x00\x01", "python3 python3-pytest")
    assert base == recipe_hash("bookworm", b"\x00\x01", "python3 python3-pytest")
    assert len(base) == 16 and int(base, 16) >= 0
    assert base != recipe_hash("bookworm", b"\x00\x01", "python3 python3-numpy")
    assert base != recipe_hash("bookworm", b"\x00\x02", "python3 python3-pytest")
    # parts are length-prefixed: moving a boundary is a different recipe
    assert recipe_hash("ab", "c") != recipe_hash("a", "bc")


def test_image_recipe_follows_the_package_list(monkeypatch: pytest.MonkeyPatch) -> None:
    before = recipe_hash(rootfs.image_recipe())
    monkeypatch.setattr(rootfs, "IMAGE_PACKAGES", (*rootfs.IMAGE_PACKAGES, "strace"))
    assert "strace" in rootfs.image_recipe()
    assert recipe_hash(rootfs.image_recipe()) != before


def test_drop_stale_keeps_the_current_artifact_and_unrelated_files(tmp_path: Path) -> None:
    keep = tmp_path / "initramfs-new.cpio"
    for name in ("initramfs-old1.cpio", "initramfs-old2.cpio", keep.name, "rootfs-x.ext4"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "initramfs-dir.cpio").mkdir()  # only files are dropped
    _drop_stale(tmp_path, "initramfs-*.cpio", keep)
    assert _cached(tmp_path, "*") == ["initramfs-dir.cpio", keep.name, "rootfs-x.ext4"]


def test_first_run_builds_everything_then_all_is_cached(fake: FakeBuilders) -> None:
    first = prepare_artifacts("image", log=False)
    assert first.built == ("kernel 6.1.0-99-amd64", "initramfs", "debian image")
    assert first.initramfs.exists() and first.root_image is not None
    assert first.root_image.exists() and first.root_image.parent == fake.cache
    again = prepare_artifacts("image", log=False)
    assert again.built == ()
    assert (again.initramfs, again.root_image) == (first.initramfs, first.root_image)
    assert len(fake.initramfs_builds) == 1 and len(fake.image_builds) == 1


def test_host_root_builds_no_image(fake: FakeBuilders) -> None:
    built = prepare_artifacts("host", log=False)
    assert built.root_image is None and "debian image" not in built.built
    assert fake.image_builds == [] and _cached(fake.cache, "rootfs-*") == []


def test_a_changed_input_rebuilds_only_what_depends_on_it(fake: FakeBuilders) -> None:
    first = prepare_artifacts("image", log=False)
    fake.init_script = b"#!/bin/sh\necho init v2\n"
    second = prepare_artifacts("image", log=False)
    assert second.built == ("initramfs",)
    assert second.initramfs != first.initramfs
    assert second.initramfs.read_bytes().endswith(b"v2\n")
    assert not first.initramfs.exists()  # the stale initramfs was dropped
    assert second.root_image == first.root_image and first.root_image is not None
    assert first.root_image.exists()  # the image did not depend on the init script


def test_a_changed_package_list_rebuilds_the_image_and_drops_the_old_one(
        fake: FakeBuilders, monkeypatch: pytest.MonkeyPatch) -> None:
    first = prepare_artifacts("image", log=False)
    monkeypatch.setattr(rootfs, "IMAGE_PACKAGES", (*rootfs.IMAGE_PACKAGES, "strace"))
    second = prepare_artifacts("image", log=False)
    assert second.built == ("debian image",)
    assert second.root_image is not None and second.root_image != first.root_image
    assert _cached(fake.cache, "rootfs-*.ext4") == [second.root_image.name]
    assert second.initramfs == first.initramfs and first.initramfs.exists()


def test_a_changed_module_list_changes_the_kernel_and_initramfs_keys(
        fake: FakeBuilders, monkeypatch: pytest.MonkeyPatch) -> None:
    first = prepare_artifacts("none", log=False)
    monkeypatch.setattr(kernel, "GUEST_MODULES", (*kernel.GUEST_MODULES, "virtio_net"))
    second = prepare_artifacts("none", log=False)
    assert fake.kernel_keys[0] != fake.kernel_keys[1]
    assert second.built == ("kernel 6.1.0-99-amd64", "initramfs")
    assert second.initramfs != first.initramfs and not first.initramfs.exists()


def test_a_missing_artifact_is_rebuilt_and_reported(fake: FakeBuilders) -> None:
    first = prepare_artifacts("image", log=False)
    first.initramfs.unlink()
    assert first.root_image is not None
    first.root_image.unlink()
    again = prepare_artifacts("image", log=False)
    assert again.built == ("initramfs", "debian image")
    assert again.initramfs == first.initramfs and again.initramfs.exists()
    assert again.root_image == first.root_image and first.root_image.exists()


def test_a_failed_build_keeps_the_previous_artifact(
        fake: FakeBuilders, monkeypatch: pytest.MonkeyPatch) -> None:
    first = prepare_artifacts("image", log=False)
    monkeypatch.setattr(rootfs, "IMAGE_PACKAGES", (*rootfs.IMAGE_PACKAGES, "strace"))
    fake.fail_image = True
    with pytest.raises(HarnessError, match="debootstrap failed"):
        prepare_artifacts("image", log=False)
    assert first.root_image is not None and first.root_image.exists()


def test_no_kernel_package_and_nothing_cached_names_the_fix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel, "newest_kernel_package", lambda: None)
    with pytest.raises(HarnessError, match=r"none is cached: run scripts/setup-host\.sh"):
        kernel.fetch_kernel(tmp_path, "k1")
    unpacked = tmp_path / "kernel-6.1.0-7-amd64-k1"
    unpacked.mkdir()
    (unpacked / "kernel.json").write_text(json.dumps(
        {"release": "6.1.0-7-amd64", "package_version": "6.1.70-1", "load_order": ["a.ko"]}))
    cached, fetched = kernel.fetch_kernel(tmp_path, "k1")
    assert not fetched and cached.release == "6.1.0-7-amd64"
    assert cached.image == unpacked / "bzImage"  # no vmlinux was extracted
    with pytest.raises(HarnessError):  # another recipe's kernel is not used
        kernel.fetch_kernel(tmp_path, "k2")


def test_without_apt_the_newest_cached_kernel_is_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel, "newest_kernel_package", lambda: None)
    for abi in (9, 10, 8):
        unpacked = tmp_path / f"kernel-6.1.0-{abi}-amd64-k1"
        unpacked.mkdir()
        (unpacked / "kernel.json").write_text(json.dumps(
            {"release": f"6.1.0-{abi}-amd64", "package_version": "1", "load_order": []}))
    cached, fetched = kernel.fetch_kernel(tmp_path, "k1")
    assert not fetched and cached.release == "6.1.0-10-amd64"  # 10 > 9, as numbers


def test_cache_dir_follows_the_environment(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VGPU_CACHE_DIR", str(tmp_path / "somewhere"))
    assert artifacts.cache_dir() == tmp_path / "somewhere"
    assert (tmp_path / "somewhere").is_dir()


def test_another_kernel_release_or_module_set_rebuilds_the_initramfs(fake: FakeBuilders) -> None:
    first = prepare_artifacts("none", log=False)
    fake.release = "6.1.0-100-amd64"  # a newer ABI under the same recipe
    second = prepare_artifacts("none", log=False)
    assert second.built == ("initramfs",) and second.initramfs != first.initramfs
    fake.load_order = ("kernel/a.ko", "kernel/b.ko")
    third = prepare_artifacts("none", log=False)
    assert third.built == ("initramfs",) and third.initramfs != second.initramfs


def test_the_host_root_is_checked_only_for_a_host_root(
        fake: FakeBuilders, monkeypatch: pytest.MonkeyPatch) -> None:
    def lacking() -> None:
        raise HarnessError("host root lacks /usr/bin/python3")

    monkeypatch.setattr(rootfs, "check_host_root", lacking)
    with pytest.raises(HarnessError, match="host root lacks"):
        prepare_artifacts("host", log=False)
    assert prepare_artifacts("none", log=False).root_image is None
    assert prepare_artifacts("image", log=False).root_image is not None


def test_a_build_waits_for_the_cache_lock(fake: FakeBuilders,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    fake.cache.mkdir(parents=True)
    done: list[artifacts.GuestArtifacts] = []
    with (fake.cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder = threading.Thread(target=lambda: done.append(prepare_artifacts("none",
                                                                                log=False)))
        builder.start()
        out, deadline = "", time.monotonic() + 10
        while "waiting for another build" not in out and time.monotonic() < deadline:
            time.sleep(0.01)
            out += capsys.readouterr().out
        assert "waiting for another build" in out
        assert builder.is_alive() and fake.kernel_keys == []  # nothing built under our lock
        fcntl.flock(lock, fcntl.LOCK_UN)
    builder.join(5)
    assert len(done) == 1 and done[0].built == ("kernel 6.1.0-99-amd64", "initramfs")


def test_an_empty_cache_dir_variable_means_the_default(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VGPU_CACHE_DIR", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert artifacts.cache_dir() == tmp_path / ".cache" / "vgpu-backend"
