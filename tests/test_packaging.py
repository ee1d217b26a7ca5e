"""What `pip install .` ships: the web page's files and the command-line client's entry point."""

import subprocess
import sys
import zipfile

from tests.helpers import ROOT


def test_wheel_ships_static_files_and_the_cli(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path), str(ROOT)], check=True, timeout=300)
    (wheel,) = tmp_path.glob("musicgen_service-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert {f"app/static/{name}" for name in ("index.html", "app.js", "style.css")} <= names
        assert z.read("generate_music.py") == (ROOT / "scripts" / "generate_music.py").read_bytes()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "musicgen-generate = generate_music:main" in z.read(entry_points).decode()
