from setuptools import find_packages, setup

setup(
    name="musicgen-service",
    version="0.1.0",
    description="Text-to-music HTTP API on MusicGen (audiocraft), streaming progress over Server-Sent Events",
    packages=find_packages(include=["app", "app.*"]),
    # csrc: the CPU kernels' sources, built at run time (app/kernel_build.py)
    package_data={"app": ["static/*", "csrc/*.cpp", "csrc/*.h"]},
    # The command-line client stays a standalone file (standard library only, copy it anywhere);
    # installed, it is the top-level module `generate_music` behind the `musicgen-generate` command.
    package_dir={"app": "app", "": "scripts"},
    py_modules=["generate_music"],
    entry_points={"console_scripts": ["musicgen-generate=generate_music:main"]},
    python_requires=">=3.11",
    # Nothing: the client needs only the standard library, and the server runs on the exact set pinned in
    # requirements.txt, which scripts/serve installs with --no-deps. Named here, audiocraft==1.3.0 would make pip
    # resolve its stale pins (av==11.0.0 from source, which does not build) and `pip install .` would fail.
    install_requires=[],
)
