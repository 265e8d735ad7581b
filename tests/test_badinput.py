"""Bad input gets a clear one-line error, never a traceback or a hang.

Recipes, image names, run options and matrix files go through the CLI as a user would
type them (a separate process: exit 125, one ``nestbed: error:`` line naming what and
where).  Corrupt disk images (truncated, bad magic, fuzzed headers of every format the
chains use) go to :mod:`harness.diskfmt`'s verification steps, driven by hypothesis.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, nestbed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import diskfmt
from harness.diskfmt import DiskFormatError
from harness.vm.spec import DiskFormat

GOOD = 'kind = "tiny"\narch = "x86_64"\nkernel = "linux-image-cloud-amd64"\n'


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    (tmp_path / "recipes").mkdir(exist_ok=True)
    return {**os.environ, "NESTBED_CACHE": str(tmp_path / "cache"), "NESTBED_IMAGES": str(tmp_path / "recipes"),
            **extra}


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The single error line of a failed nestbed command (and nothing else on stderr but progress)."""
    assert proc.returncode == 125, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("nestbed: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def _nothing_built(cache: Path) -> None:
    images = cache / "images"
    if images.is_dir():
        assert not list(images.glob("*/manifest.json")), list(images.iterdir())
        assert not list(images.glob(".*.part*")), "a failed build left its work directory"


# -- recipes ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "key", "reason"), [
    (GOOD + "colour = 1\n", "colour", "unknown key"),
    (GOOD + 'memory_mb = "lots"\n', "memory_mb", "must be int, got str"),
    (GOOD + "memory_mb = 1e9\n", "memory_mb", "must be int, got float"),
    (GOOD + 'packages = "busybox"\n', "packages", "must be list, got str"),
    (GOOD + 'extra_suites = ["updates", 3]\n', "extra_suites", "items must be strings"),
    (GOOD + "files = 3\n", "files", "must be dict"),
    (GOOD + '[files]\n"/etc/x" = { a = 1 }\n', "files./etc/x", "content must be a string"),
    (GOOD + '[files]\n"/" = "y"\n', "files./", "name a file"),
    (GOOD + 'services = ["$(reboot)"]\n', "services", "not a valid name"),
    (GOOD.replace("linux-image-cloud-amd64", "linux-image; rm -rf /"), "kernel", "not a valid package name"),
    (GOOD + "ready_timeout = nan\n", "ready_timeout", "must be a number of seconds"),
    (GOOD + "ready_timeout = inf\n", "ready_timeout", "must be a number of seconds"),
    (GOOD + "vcpus = 100000000000000000000\n", "vcpus", "outside 1..64"),
    (GOOD.encode() + b'description = "\xff\xfe"\n', "-", "not UTF-8 text"),
    ("kind = 'tiny\n", "-", "not valid TOML"),
], ids=["unknown-key", "str-for-int", "float-for-int", "str-for-list", "int-in-list", "int-for-table",
        "table-for-content", "root-as-file", "shell-in-service", "shell-in-kernel", "nan-timeout", "inf-timeout",
        "huge-int", "not-utf8", "bad-toml"])
def test_malformed_recipe_is_one_line_naming_file_and_key(tmp_path: Path, text: str | bytes, key: str,
                                                          reason: str) -> None:
    recipes = tmp_path / "recipes"
    recipes.mkdir(exist_ok=True)
    path = recipes / "broken.toml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    line = _one_line_error(nestbed("images", "build", "broken", env=_env(tmp_path), timeout=60))
    assert line.startswith(f"nestbed: error: {path}: {key}: "), line
    assert reason in line, line
    _nothing_built(tmp_path / "cache")


def test_a_broken_recipe_among_good_ones_is_named_by_list(tmp_path: Path) -> None:
    recipes = tmp_path / "recipes"
    recipes.mkdir(exist_ok=True)
    (recipes / "fine.toml").write_text(GOOD)
    (recipes / "zbroken.toml").write_text(GOOD + "vcpus = true\n")
    line = _one_line_error(nestbed("images", "list", env=_env(tmp_path), timeout=60))
    assert f"{recipes / 'zbroken.toml'}: vcpus: must be int, got bool" in line


def test_unknown_image_names_fail_before_anything_is_built_or_booted(tmp_path: Path) -> None:
    started = time.monotonic()
    line = _one_line_error(nestbed("images", "build", "tiny-x86_64", "no-such-image", env=_env(tmp_path), timeout=60))
    assert "unknown image 'no-such-image'" in line
    _nothing_built(tmp_path / "cache")
    # At level 2 the name is checked before an L1 is built or booted.
    line = _one_line_error(nestbed("run", "no-such-image", "--level", "2", "--", "true", env=_env(tmp_path),
                                   timeout=60))
    assert "unknown image 'no-such-image'" in line
    assert time.monotonic() - started < 30
    assert not list((tmp_path / "cache").glob("run/*")), "no run directory for a guest that never started"


@pytest.mark.boot  # needs the tiny image built and the accelerator probed (which may boot a guest once)
@pytest.mark.parametrize(("argv", "needle"), [
    (["--vcpus", "0"], "vcpus: 0 is outside"),
    (["--memory", "0"], "memory_mb: 0 is below"),
    (["--memory", "-5"], "memory_mb: -5 is below"),
    (["--timeout", "nan"], "--timeout nan is not"),
    (["--timeout", "-1"], "--timeout -1 is not"),
    (["--kernel", "/nonexistent/vmlinuz"], "--kernel /nonexistent/vmlinuz: no such file"),
    (["--level", "0"], "invalid choice: 0"),
    (["--via", "telnet"], "invalid choice: 'telnet'"),
], ids=["vcpus-0", "memory-0", "memory-negative", "timeout-nan", "timeout-negative", "kernel-missing", "level-0",
        "via-telnet"])
def test_bad_run_options_are_refused_before_a_boot(tiny_images: None, argv: list[str], needle: str) -> None:
    started = time.monotonic()
    line = _one_line_error(nestbed("run", "tiny-x86_64", *argv, "--", "true", timeout=60))
    assert needle in line
    assert time.monotonic() - started < 20, "refusing an option must not need a guest"


@pytest.mark.boot  # needs the machine's apt sources and a minute of mmdebstrap, no QEMU
def test_kernel_package_that_does_not_exist_names_it_and_marks_nothing_built(tmp_path: Path) -> None:
    recipes = tmp_path / "recipes"
    recipes.mkdir(exist_ok=True)
    (recipes / "tiny-ghost.toml").write_text(GOOD.replace("linux-image-cloud-amd64", "linux-image-nestbed-ghost"))
    proc = nestbed("images", "build", "tiny-ghost", env=_env(tmp_path), timeout=600)
    line = _one_line_error(proc)
    assert "package linux-image-nestbed-ghost does not exist" in line, line
    _nothing_built(tmp_path / "cache")
    assert nestbed("images", "list", "--json", env=_env(tmp_path), timeout=60).stdout.count('"built": true') == 0


# -- matrix files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "key", "needle"), [
    ("version = 1\ncolour = 2\n", "colour", "unknown key"),
    ("[[row]]\nimage = 'tiny-x86_64'\n", "row", "unknown key"),
    ("version = 1\n[axes.arch]\nparams = 'arch'\n", "axes.arch.params", "list of strings"),
    ("this is = = not toml\n", "-", "not valid TOML"),
], ids=["unknown-key", "unknown-table", "str-for-list", "bad-toml"])
def test_malformed_matrix_file_is_one_line_naming_file_and_key(tmp_path: Path, text: str, key: str,
                                                               needle: str) -> None:
    path = tmp_path / "matrix.toml"
    path.write_text(text)
    line = _one_line_error(nestbed("matrix", "--tier", "smoke", "--matrix", str(path), timeout=120))
    assert line.startswith(f"nestbed: error: {path}: {key}: ") and needle in line, line


# -- corrupt disk images ----------------------------------------------------------------------

FUZZ_FORMATS = [DiskFormat.VMDK, DiskFormat.VPC, DiskFormat.VHDX, DiskFormat.QCOW2, DiskFormat.VDI]
VIRTUAL = 4 << 20


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[DiskFormat, bytes]:
    """A small valid image of each format, holding 1 MiB of data in a 4 MiB disk."""
    d = tmp_path_factory.mktemp("pristine")
    raw = d / "src.raw"
    with open(raw, "wb") as f:
        f.write(os.urandom(1 << 20))
        f.truncate(VIRTUAL)
    out = {}
    for fmt in FUZZ_FORMATS:
        dst = d / f"src.{diskfmt.EXTENSION[fmt]}"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt.value, str(raw), str(dst)], check=True,
                       timeout=60, capture_output=True)
        out[fmt] = dst.read_bytes()
    return out


def _verify(path: Path, fmt: DiskFormat) -> None:
    """Every verification step diskfmt has, each either passing or raising DiskFormatError."""
    try:
        size = int(diskfmt.info(path, fmt)["virtual-size"])
    except DiskFormatError:
        return  # refused at the door: fine
    for step in (lambda: diskfmt.check(path, fmt), lambda: diskfmt.independent_hash(path, fmt, min(size, VIRTUAL))):
        try:
            step()
        except DiskFormatError as exc:
            # One line (nothing after a newline, not even a trailing one) that names the image.
            message = str(exc)
            assert message.strip() and "\n" not in message, message
            assert path.name in message, message


mutation = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("magic"), st.binary(min_size=4, max_size=4)),
    # Header fields: sizes, offsets, table counts live in the first KiBs (VHD's footer at the end).
    st.tuples(st.just("bytes"), st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=16)),
    st.tuples(st.just("words"), st.lists(st.tuples(st.integers(0, 4088), st.sampled_from(
        [0, 1, 0xFFFFFFFF, 1 << 31, 1 << 40, (1 << 64) - 1, 1 << 62])), min_size=1, max_size=4)),
)


MAGIC_AT = {DiskFormat.VDI: 0x40}  # VDI starts with a text banner; its signature is at 0x40


def _mutate(data: bytes, fmt: DiskFormat, how: tuple[str, object]) -> bytes:
    kind, arg = how
    buf = bytearray(data)
    if kind == "truncate":
        return bytes(buf[:int(len(buf) * float(arg))])  # type: ignore[arg-type]
    if kind == "magic":
        assert isinstance(arg, bytes)
        at = MAGIC_AT.get(fmt, 0)
        buf[at:at + 4] = arg
        if fmt is DiskFormat.VPC:
            buf[-512:-504] = arg * 2  # VHD's cookie is in its footer too
        return bytes(buf)
    base = len(buf) - 512 if fmt is DiskFormat.VPC else 0
    for off, value in arg:  # type: ignore[attr-defined]
        if kind == "bytes":
            buf[(base + off) % len(buf)] = value
        else:
            at = (base + off) % (len(buf) - 8)
            buf[at:at + 8] = struct.pack("<Q" if fmt in (DiskFormat.VMDK, DiskFormat.VDI, DiskFormat.VHDX) else ">Q",
                                         value)
    return bytes(buf)


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(fmt=st.sampled_from(FUZZ_FORMATS), how=mutation)
def test_fuzzed_disk_headers_give_clear_errors(pristine: dict[DiskFormat, bytes], tmp_path: Path,
                                               fmt: DiskFormat, how: tuple[str, object]) -> None:
    path = tmp_path / f"fuzz.{diskfmt.EXTENSION[fmt]}"
    path.write_bytes(_mutate(pristine[fmt], fmt, how))
    started = time.monotonic()
    _verify(path, fmt)
    assert time.monotonic() - started < 60, "a corrupt image must not make the verifier hang"


@pytest.mark.parametrize("fmt", FUZZ_FORMATS)
def test_bad_magic_is_refused_by_a_chain(pristine: dict[DiskFormat, bytes], tmp_path: Path, fmt: DiskFormat) -> None:
    path = tmp_path / f"badmagic.{diskfmt.EXTENSION[fmt]}"
    path.write_bytes(_mutate(pristine[fmt], fmt, ("magic", b"XXXX")))
    with pytest.raises(DiskFormatError, match="badmagic"):
        diskfmt.run_chain(path, [diskfmt.Hop(DiskFormat.RAW)], tmp_path, source_format=fmt)


# A VDI cut in half passes `qemu-img check` (its lost blocks read as zeros): diskfmt's
# check_extents finds data mapped past the end of the file.
@pytest.mark.parametrize("fmt", FUZZ_FORMATS)
def test_truncated_image_is_refused_by_a_chain(pristine: dict[DiskFormat, bytes], tmp_path: Path,
                                               fmt: DiskFormat) -> None:
    data = pristine[fmt]
    path = tmp_path / f"half.{diskfmt.EXTENSION[fmt]}"
    path.write_bytes(data[:len(data) // 2])  # the header survives, half of the data does not
    with pytest.raises(DiskFormatError, match="half"):
        diskfmt.run_chain(path, [diskfmt.Hop(DiskFormat.RAW)], tmp_path, source_format=fmt)


HUGE_VMDK = """
import struct, sys
from pathlib import Path
from harness import diskfmt
from harness.diskfmt import DiskFormatError, Hop
from harness.vm.spec import DiskFormat
p = Path(sys.argv[1])
d = bytearray(p.read_bytes())
d[12:20] = struct.pack("<Q", (1 << 40) // 512)  # capacity: 1 TiB, no grain tables to match
p.write_bytes(bytes(d))
try:
    diskfmt.run_chain(p, [Hop(DiskFormat.RAW)], p.parent, source_format=DiskFormat.VMDK)
except DiskFormatError as exc:
    print("refused:", exc)
"""


def test_a_header_claiming_a_huge_disk_is_refused_quickly(pristine: dict[DiskFormat, bytes], tmp_path: Path) -> None:
    path = tmp_path / "huge.vmdk"
    path.write_bytes(pristine[DiskFormat.VMDK])
    # In a child with a hard limit: the bug is a hang, and it must not hang this suite.
    try:
        proc = subprocess.run([sys.executable, "-c", HUGE_VMDK, str(path)], cwd=REPO, capture_output=True,
                              text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("run_chain was still hashing a 1 TiB virtual disk after 30 s")
    finally:
        for leftover in tmp_path.glob("*.raw"):
            leftover.unlink()  # the sparse 1 TiB conversion, if the child was killed mid-way
    assert "refused:" in proc.stdout, proc.stdout + proc.stderr
