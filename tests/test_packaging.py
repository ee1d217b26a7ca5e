"""What `pip install .` ships, and that it installs in a fresh virtualenv and gives a working client."""

import subprocess
import sys
import venv
import wave
import zipfile

import pytest

from tests.helpers import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The project's wheel, built as `pip install .` builds it (setuptools; here without build isolation)."""
    directory = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(directory), str(ROOT)], check=True, timeout=300)
    (built,) = directory.glob("musicgen_service-*.whl")
    return built


def test_wheel_ships_static_files_the_kernel_sources_and_the_cli(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert {f"app/static/{name}" for name in ("index.html", "app.js", "style.css")} <= names
        sources = sorted((ROOT / "app" / "csrc").iterdir())
        assert {path.suffix for path in sources} == {".cpp", ".h"}  # what package_data names
        for path in sources:
            assert z.read(f"app/csrc/{path.name}") == path.read_bytes()
        assert z.read("generate_music.py") == (ROOT / "scripts" / "generate_music.py").read_bytes()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "musicgen-generate = generate_music:main" in z.read(entry_points).decode()


def test_installs_in_a_fresh_venv_from_no_index_and_the_client_generates(wheel, tmp_path, server):
    # Before, the wheel required audiocraft==1.3.0, whose stale pins sent pip to build av==11.0.0 from source,
    # which fails; with no index at all, anything the wheel requires makes this install fail.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    installed = subprocess.run([*pip, "install", "--no-index", "--find-links", str(wheel.parent), "musicgen-service"],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    listed = subprocess.run([*pip, "list", "--format=freeze"], capture_output=True, text=True, check=True).stdout
    assert {line.split("==")[0] for line in listed.split()} <= {"musicgen-service", "pip", "setuptools"}

    out = tmp_path / "strings.wav"
    run = subprocess.run([str(env_dir / "bin" / "musicgen-generate"), "strings", "--duration", "1", "--seed", "3",
                          "--url", server.url, "-q", "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnframes()) == (32000, 32000)
