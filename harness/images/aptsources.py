"""The machine's own Debian apt sources, restricted to the suites a build needs.

nestbed names no mirror anywhere: it reads ``/etc/apt/sources.list.d/*.sources``
(deb822) and ``/etc/apt/sources.list`` (one-line format), keeps the entries that carry
the wanted suites, and writes a deb822 file for mmdebstrap.  Restricting the suites
matters: one index failing ("Mirror sync in progress?") fails the whole build, so a
build asks only for what it uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ImageBuildError

APT_DIR = Path("/etc/apt")


@dataclass(frozen=True)
class Source:
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None = None
    origin: str = ""

    def deb822(self) -> str:
        lines = ["Types: deb", f"URIs: {' '.join(self.uris)}", f"Suites: {' '.join(self.suites)}",
                 f"Components: {' '.join(self.components)}"]
        if self.signed_by:
            lines.append(f"Signed-By: {self.signed_by}")
        return "\n".join(lines) + "\n"


def parse_deb822(text: str, origin: str = "") -> list[Source]:
    out: list[Source] = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for raw in stanza.splitlines():
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
            if raw[0] in " \t" and key:
                fields[key] += " " + raw.strip()
                continue
            key, _, value = raw.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        out.append(Source(tuple(fields.get("uris", "").split()), tuple(fields.get("suites", "").split()),
                          tuple(fields.get("components", "").split()), fields.get("signed-by"), origin))
    return out


def parse_one_line(text: str, origin: str = "") -> list[Source]:
    out: list[Source] = []
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if len(words) < 3 or words[0] != "deb":
            continue
        signed_by = None
        if words[1].startswith("["):
            opts = []
            while words and not words[1].endswith("]"):
                opts.append(words.pop(1))
            opts.append(words.pop(1))
            for opt in " ".join(opts).strip("[]").split():
                if opt.startswith("signed-by="):
                    signed_by = opt.split("=", 1)[1]
        out.append(Source((words[1],), (words[2],), tuple(words[3:]), signed_by, origin))
    return out


def machine_sources(apt_dir: Path = APT_DIR) -> list[Source]:
    sources: list[Source] = []
    main = apt_dir / "sources.list"
    if main.is_file():
        sources += parse_one_line(main.read_text(), str(main))
    d = apt_dir / "sources.list.d"
    if d.is_dir():
        for p in sorted(d.iterdir()):
            if p.suffix == ".sources":
                sources += parse_deb822(p.read_text(), str(p))
            elif p.suffix == ".list":
                sources += parse_one_line(p.read_text(), str(p))
    return sources


def restricted(sources: Iterable[Source], suites: Iterable[str]) -> list[Source]:
    """The entries carrying any of *suites*, each cut down to those suites."""
    wanted = list(suites)
    sources = list(sources)
    out = []
    for src in sources:
        keep = tuple(s for s in src.suites if s in wanted)
        if keep:
            out.append(Source(src.uris, keep, src.components, src.signed_by, src.origin))
    missing = [s for s in wanted if not any(s in src.suites for src in out)]
    # Debian's backports live beside the main suite on the same mirror, but few machines list
    # them: derive "<suite>-backports" from the entry that carries "<suite>" (same URIs, keys).
    for suite in list(missing):
        base = suite.removesuffix("-backports")
        donor = next((src for src in sources if suite != base and base in src.suites), None)
        if donor is not None:
            out.append(Source(donor.uris, (suite,), donor.components, donor.signed_by, donor.origin))
            missing.remove(suite)
    if missing:
        raise ImageBuildError(
            f"the machine's apt sources ({APT_DIR}/sources.list*) carry no entry for suite(s) "
            f"{', '.join(missing)}; add one, or drop it from the recipe's extra_suites")
    return out


def write_sources(path: Path, suites: Iterable[str], apt_dir: Path = APT_DIR) -> Path:
    entries = restricted(machine_sources(apt_dir), suites)
    path.write_text("\n".join(e.deb822() for e in entries))
    return path
