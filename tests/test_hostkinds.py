"""The accelerator decision on the kinds of host users have, from recorded facts (no QEMU boots).

Each host kind is a small fake tree (``proc/cpuinfo``, ``sys/module/kvm_*/parameters/nested``,
``dev/kvm`` as a regular file with a mode and a group, ``etc/group``) read by the real
:mod:`harness.hosts.hostfacts` readers, plus the KVM boot results the probe would have seen, fed to
:func:`harness.hosts.probe.decide`; the L1 it would boot comes from :func:`harness.nested.l1_options`.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness.hosts import hostfacts
from harness.hosts.probe import decide, host_facts, l1_nested
from harness.nested import L1_TCG_VCPUS, l1_options
from harness.vm.spec import Accel

RECIPE_VCPUS, RECIPE_MEMORY = 2, 2048
BOOTED = {"x86_64": (True, "a tiny x86_64 guest booted under KVM in 0.9 s (x86_64)"),
          "i386": (True, "a tiny i386 guest booted under KVM in 0.8 s (i686)")}
HUNG = {a: (False, "no ready marker in 15 s; the guest printed nothing") for a in ("x86_64", "i386")}


def _cpuinfo(vendor: str, model: str, flags: str, cpus: int = 4) -> str:
    return "".join(f"processor\t: {n}\nvendor_id\t: {vendor}\nmodel name\t: {model}\nflags\t\t: fpu {flags}\n\n"
                   for n in range(cpus))


INTEL = _cpuinfo("GenuineIntel", "Intel(R) Xeon(R) Gold 6230", "vmx ept")
AMD = _cpuinfo("AuthenticAMD", "AMD EPYC 7302", "svm npt")
INTEL_NO_VT = _cpuinfo("GenuineIntel", "Intel(R) Core(TM) i5", "sse2")
PVM = _cpuinfo("AuthenticAMD", "AMD EPYC", "hypervisor", cpus=2)  # this machine: a VM with kvm_pvm, no svm


@dataclass(frozen=True)
class Dev:
    """/dev/kvm: its mode and group, and who opens it (root, a member of its group, anyone else)."""

    mode: int = 0o660
    group: str = "kvm"
    user: str = "member"


@dataclass(frozen=True)
class Kind:
    name: str
    cpuinfo: str
    modules: dict[str, str | None]  # module -> its nested parameter (None: no such parameter)
    dev: Dev | None
    boots: dict[str, tuple[bool, str]] = field(default_factory=dict)
    # expected
    chosen: str = "kvm"
    hint: str = ""  # in every arch's reason (x86_64's only where hint_x86_64_only)
    hint_x86_64_only: bool = False
    nested_capable: bool = False
    l2_accel: str = "kvm"  # how an L1's L2s run, by l1_nested
    exact_reason: str | None = None  # x86_64's reason, where it must stay word for word


PVM_REASON = ("/dev/kvm opens (modules: kvm, kvm_pvm) but a standard x86_64 guest does not boot under it: "
              "no ready marker in 15 s; the guest printed nothing")
NOT_IN_GROUP = "not in group kvm: `sudo usermod -aG kvm $USER` and log in again"
NO_VT = "the CPU shows neither vmx nor svm (virtualization off in the firmware, or a VM without nested)"

KINDS = [
    Kind("intel-vmx-nested-Y", INTEL, {"kvm": None, "kvm_intel": "Y"}, Dev(), BOOTED, nested_capable=True,
         exact_reason=BOOTED["x86_64"][1]),
    Kind("intel-vmx-nested-N", INTEL, {"kvm": None, "kvm_intel": "N"}, Dev(), BOOTED, l2_accel="tcg",
         hint="nested is off: `modprobe -r kvm_intel && modprobe kvm_intel nested=1` (until then an L1 gets no vmx "
              "from `-cpu host`, so its L2s run under TCG inside L1)", hint_x86_64_only=True),
    Kind("amd-svm-nested-1", AMD, {"kvm": None, "kvm_amd": "1"}, Dev(), BOOTED, nested_capable=True,
         exact_reason=BOOTED["x86_64"][1]),
    Kind("amd-svm-nested-0", AMD, {"kvm": None, "kvm_amd": "0"}, Dev(), BOOTED, l2_accel="tcg",
         hint="nested is off: `modprobe -r kvm_amd && modprobe kvm_amd nested=1` (until then an L1 gets no svm",
         hint_x86_64_only=True),
    # This machine: /dev/kvm (0600 root:root) opens for root, but a standard guest hangs under kvm_pvm.
    Kind("kvm_pvm", PVM, {"kvm": None, "kvm_pvm": None}, Dev(0o600, "root", "root"), HUNG, chosen="tcg",
         exact_reason=PVM_REASON),
    Kind("intel-no-dev-kvm", INTEL, {}, None, chosen="tcg", hint="no KVM module loaded: `modprobe kvm_intel`"),
    Kind("amd-no-dev-kvm", AMD, {}, None, chosen="tcg", hint="no KVM module loaded: `modprobe kvm_amd`"),
    Kind("container-without-dev-kvm", INTEL, {"kvm": None, "kvm_intel": "Y"}, None, chosen="tcg",
         nested_capable=True, hint="kvm, kvm_intel loaded but there is no /dev/kvm (in a container, pass the device in"),
    Kind("dev-kvm-not-in-group", INTEL, {"kvm": None, "kvm_intel": "Y"}, Dev(0o660, "kvm", "other"), chosen="tcg",
         nested_capable=True, hint=NOT_IN_GROUP),
    Kind("dev-kvm-root-only", AMD, {"kvm": None, "kvm_amd": "1"}, Dev(0o600, "root", "other"), chosen="tcg",
         nested_capable=True, hint="/dev/kvm is mode 0600, group root: give it to group kvm (`sudo chgrp kvm /dev/kvm "
                                   "&& sudo chmod 0660 /dev/kvm`"),
    Kind("cpu-without-vmx-or-svm", INTEL_NO_VT, {}, None, chosen="tcg", hint=NO_VT),
]


def _opener(user: str) -> hostfacts.Opener:
    """os.open as *user* would see it: root opens anything, a member by the group bits, others by the rest."""

    def open_(path: str, flags: int) -> int:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if not (user == "root" or (user == "member" and mode & 0o060 == 0o060) or mode & 0o006 == 0o006):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return os.open(path, flags)

    return open_


def _tree(root: Path, kind: Kind) -> dict[str, Any]:
    """Write *kind*'s fake tree under *root*; the reader keywords standing for its user."""
    (root / "proc/sys/kernel/random").mkdir(parents=True)
    (root / "proc/cpuinfo").write_text(kind.cpuinfo)
    (root / "proc/sys/kernel/random/boot_id").write_text(f"boot-{kind.name}\n")
    (root / "sys/module").mkdir(parents=True)
    for module, nested in kind.modules.items():
        (root / "sys/module" / module).mkdir()
        if nested is not None:
            (root / "sys/module" / module / "parameters").mkdir()
            (root / "sys/module" / module / "parameters/nested").write_text(nested + "\n")
    if kind.dev is None:
        return {}
    dev = root / "dev/kvm"
    dev.parent.mkdir()
    dev.write_bytes(b"")
    dev.chmod(kind.dev.mode)
    gid = dev.stat().st_gid
    (root / "etc").mkdir()
    (root / "etc/group").write_text(f"{kind.dev.group}:x:{gid}:\n")
    return {"opener": _opener(kind.dev.user), "user_gids": {gid} if kind.dev.user != "other" else set()}


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_host_kind_decision(kind: Kind, tmp_path: Path) -> None:
    facts = host_facts(tmp_path, qemu=False, **_tree(tmp_path, kind))
    kvm = facts["kvm"]

    # the facts as read from the tree
    assert facts["boot_id"] == f"boot-{kind.name}"
    assert kvm["modules"] == sorted(kind.modules)
    assert kvm["nested"] == {m: v for m, v in kind.modules.items() if m in ("kvm_intel", "kvm_amd")}
    assert kvm["nested_capable"] is kind.nested_capable
    assert kvm["present"] is (kind.dev is not None)
    if kind.dev is not None:
        assert (kvm["mode"], kvm["group"]) == (f"{kind.dev.mode:04o}", kind.dev.group)
        assert kvm["in_group"] is (kind.dev.user != "other")
    assert kvm["openable"] is (kind.chosen == "kvm" or kind.name == "kvm_pvm")
    if not kvm["openable"]:
        assert kvm["error"] == ("/dev/kvm: Permission denied" if kind.dev else "/dev/kvm does not exist")

    # the verdict per arch, and what it tells the user
    verdict = decide(facts, kind.boots if kvm["openable"] else {})
    assert {a: v["chosen"] for a, v in verdict.items()} == {"x86_64": kind.chosen, "i386": kind.chosen}
    if kind.exact_reason is not None:
        assert verdict["x86_64"]["reason"] == kind.exact_reason
    if kind.hint:
        assert kind.hint in verdict["x86_64"]["reason"]
        assert (kind.hint in verdict["i386"]["reason"]) is not kind.hint_x86_64_only
    if kind.chosen == "tcg" and kind.name != "kvm_pvm":
        assert verdict["x86_64"]["reason"].startswith(f"KVM unusable: {kvm['error']}; ")

    # the L1 this host would boot, and how that L1's L2s would run
    l0 = Accel(verdict["x86_64"]["chosen"])
    l1 = l1_options(l0, RECIPE_VCPUS, RECIPE_MEMORY)
    if l0 is Accel.KVM:  # Intel and AMD alike: vmx or svm passes through -cpu host where nested is on
        assert (l1.accel, l1.cpu, l1.cpu_flags, l1.vcpus) == (Accel.KVM, "host", (), RECIPE_VCPUS)
    else:
        assert (l1.accel, l1.cpu, l1.cpu_flags, l1.vcpus) == (Accel.TCG, "qemu64", ("+svm", "+npt"), L1_TCG_VCPUS)
    assert l1.memory_mb == RECIPE_MEMORY
    assert l1_nested(facts, l0)["l2_accel"] == kind.l2_accel


def test_nested_reasons_name_the_module_and_what_l1_gets() -> None:
    def facts(cpu: dict[str, object], modules: list[str], nested: dict[str, str | None]) -> dict[str, object]:
        return {"cpu": cpu, "kvm": {"openable": True, "modules": modules, "nested": nested}}

    intel = {"vendor": "GenuineIntel", "vmx": True, "svm": False}
    amd = {"vendor": "AuthenticAMD", "vmx": False, "svm": True}
    assert l1_nested(facts(intel, ["kvm", "kvm_intel"], {"kvm_intel": "Y"}), Accel.KVM) == {
        "l2_accel": "kvm", "reason": "kvm_intel nested=Y: `-cpu host` passes vmx through, so L1 has KVM of its own"}
    assert l1_nested(facts(amd, ["kvm", "kvm_amd"], {"kvm_amd": "1"}), Accel.KVM)["reason"].startswith(
        "kvm_amd nested=1: `-cpu host` passes svm through")
    unreadable = l1_nested(facts(amd, ["kvm", "kvm_amd"], {"kvm_amd": None}), Accel.KVM)
    assert unreadable["l2_accel"] == "tcg" and "kvm_amd shows no nested parameter" in unreadable["reason"]
    pvm = facts({"vendor": "AuthenticAMD", "vmx": False, "svm": False}, ["kvm", "kvm_pvm"], {})
    assert l1_nested(pvm, Accel.KVM)["l2_accel"] == "tcg"
    assert l1_nested(pvm, Accel.TCG) == {"l2_accel": "kvm", "reason": "L1 gets qemu64,+svm,+npt under TCG, which "
                                                                      "emulates SVM: L1 has KVM of its own (slow)"}


def test_permission_hints_from_the_device_facts() -> None:
    def reason(**kvm: object) -> str:
        facts = {"cpu": {"vendor": "GenuineIntel", "vmx": True}, "kvm": {
            "present": True, "openable": False, "error": "/dev/kvm: Permission denied", "errno": "EACCES",
            "modules": ["kvm", "kvm_intel"], "nested": {"kvm_intel": "Y"}, **kvm}}
        return decide(facts, {})["x86_64"]["reason"]

    assert reason(mode="0660", group="kvm", in_group=False) == f"KVM unusable: /dev/kvm: Permission denied; {NOT_IN_GROUP}"
    assert "not in group libvirt: `sudo usermod -aG libvirt $USER`" in reason(mode="0660", group="libvirt", in_group=False)
    assert "yet may not open it" in reason(mode="0660", group="kvm", in_group=True)
    # another open error: no guess at a fix
    assert reason(error="/dev/kvm: No such device", errno="ENODEV") == "KVM unusable: /dev/kvm: No such device"


def test_hostfacts_runs_standalone_with_the_standard_library(tmp_path: Path) -> None:
    # As in an L1: `python3 hostfacts.py` from another directory, no harness on the path.
    out = subprocess.run([sys.executable, "-I", str(Path(hostfacts.__file__))], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    facts = json.loads(out)
    assert {"present", "openable", "error", "modules", "nested", "nested_capable"} <= set(facts["kvm"])
    assert {"vendor", "vmx", "svm"} <= set(facts["cpu"])


def test_readers_default_to_the_real_root() -> None:
    assert hostfacts.kvm_modules() == hostfacts.kvm_modules(Path("/sys/module")) == hostfacts.kvm_modules(root="/")
    real = hostfacts.kvm_device()
    assert real["present"] is os.path.exists("/dev/kvm")
    assert real == hostfacts.kvm_device("/")


def test_a_host_with_tcg_emulated_svm_does_not_try_32_bit_kvm() -> None:
    from harness.hosts.probe import emulated_svm

    l1 = {"cpu": {"model": "QEMU Virtual CPU version 2.5+", "svm": True, "vmx": False, "hypervisor": True}}
    why = emulated_svm(l1)
    assert why is not None and "invalid tss type" in why and "QEMU Virtual CPU version 2.5+" in why
    for cpu in ({"model": "AMD EPYC 7B13", "svm": True, "hypervisor": False},
                {"model": "AMD EPYC 7B13", "svm": True, "hypervisor": True},   # a real CPU passed through
                {"model": "QEMU Virtual CPU version 2.5+", "svm": False, "hypervisor": True}):
        assert emulated_svm({"cpu": cpu}) is None
