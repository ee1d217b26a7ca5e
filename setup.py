from setuptools import find_packages, setup

setup(
    name="musicgen-service",
    version="0.1.0",
    description="Text-to-music HTTP API on MusicGen (audiocraft), streaming progress over Server-Sent Events",
    packages=find_packages(include=["app", "app.*"]),
    package_data={"app": ["static/*"]},
    # The command-line client stays a standalone file (standard library only, copy it anywhere);
    # installed, it is the top-level module `generate_music` behind the `musicgen-generate` command.
    package_dir={"app": "app", "": "scripts"},
    py_modules=["generate_music"],
    entry_points={"console_scripts": ["musicgen-generate=generate_music:main"]},
    python_requires=">=3.11",
    # The exact, complete set is pinned in requirements.txt (installed with --no-deps).
    install_requires=["audiocraft==1.3.0", "flask>=3", "flask-cors>=6", "gunicorn>=23", "pydantic>=2.6", "soundfile",
                      "torch>=2.6"],
)
