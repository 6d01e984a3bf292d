"""The wheel that pip builds (and the container image installs): the
compiled extensions, stripped, without their sources; the license as an
SPDX expression."""

import email
import os
import shutil
import struct
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def elf_sections(data: bytes) -> set[str]:
    """The section names of a 64-bit little-endian ELF file."""
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    def header(i):
        return struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
    names_off = header(shstrndx)[4]
    names = set()
    for i in range(shnum):
        start = names_off + header(i)[0]
        names.add(data[start:data.index(b"\0", start)].decode())
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Built from a clean copy of the sources, as pip builds it from a
    checkout (a local build/ directory would be reused as it is)."""
    src = tmp_path_factory.mktemp("src") / "smg"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "*.so", "*.c",
                                                             "__pycache__", ".dev", ".pytest_cache"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, timeout=1200)
    (name,) = [f for f in os.listdir(out) if f.endswith(".whl")]
    return zipfile.ZipFile(out / name)


def test_the_wheel_has_stripped_extensions_and_no_sources(wheel):
    names = wheel.namelist()
    extensions = [n for n in names if n.startswith("smg/_fast/") and n.endswith(".so")]
    assert len(extensions) >= 18
    assert not [n for n in names if n.endswith((".pyx", ".pxd", ".c"))], "sources shipped"
    for name in extensions:
        sections = elf_sections(wheel.read(name))
        assert ".symtab" not in sections and not any(s.startswith(".debug") for s in sections), name
    assert "smg/discovery/files.py" in names and "smg/tls.py" in names


def test_the_wheel_metadata(wheel):
    (meta_name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    meta = email.message_from_bytes(wheel.read(meta_name))
    assert meta["License-Expression"] == "Apache-2.0"
    assert "tracing" in meta.get_all("Provides-Extra")
    requires = meta.get_all("Requires-Dist")
    assert any(r.startswith("uvloop") for r in requires)
    assert not any(r.startswith("opentelemetry") and "extra" not in r for r in requires)  # tracing is optional


def test_discovery_needs_no_kubernetes_aio():
    """The image deletes kubernetes/aio (the client's asyncio copy, ~70 MB):
    smg's discovery must import and build its API client without it."""
    code = (
        "import sys\n"
        "class Trimmed:\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'kubernetes.aio' or name.startswith('kubernetes.aio.'):\n"
        "            raise ImportError('trimmed from the image')\n"
        "sys.meta_path.insert(0, Trimmed())\n"
        "import smg.discovery.kubernetes, smg.discovery.reconcile, smg.gateway\n"
        "from kubernetes import client, config, watch\n"
        "from kubernetes.client.rest import ApiException\n"
        "client.CoreV1Api(client.ApiClient(client.Configuration()))\n"
        "assert not any(m.startswith('kubernetes.aio') for m in sys.modules)\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.stdout.strip() == "ok", out.stderr


def test_the_image_checks_its_health_and_keeps_no_build_layers():
    dockerfile = open(os.path.join(ROOT, "Dockerfile")).read()
    assert "HEALTHCHECK" in dockerfile and "/liveness" in dockerfile
    runtime = dockerfile.split("\nFROM ")[-1]
    assert "COPY --from" not in runtime  # the wheels come through a bind mount, not a layer
    assert "--mount=type=bind,from=build" in runtime and "USER 10001" in runtime
    assert "gcc" not in runtime
