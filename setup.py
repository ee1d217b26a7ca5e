from setuptools import find_packages, setup

setup(
    name="musicgen-service",
    version="0.1.0",
    description="Text-to-music HTTP API on MusicGen (audiocraft), streaming progress over Server-Sent Events",
    packages=find_packages(include=["app", "app.*"]),
    package_data={"app": ["static/*"]},
    # musicgen_generate.py is a link to scripts/generate_music.py, the standalone command-line client
    # (standard library only), so that it is importable for its console entry point.
    py_modules=["wsgi", "musicgen_generate"],
    entry_points={"console_scripts": ["musicgen-generate=musicgen_generate:main"]},
    python_requires=">=3.11",
    # The exact, complete set is pinned in requirements.txt (installed with --no-deps).
    install_requires=["audiocraft==1.3.0", "flask>=3", "gunicorn>=23", "pydantic>=2.6", "soundfile", "torch>=2.6"],
)
