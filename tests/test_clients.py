"""The two client examples printed in the original API document, run unchanged against the server.

Their code is read from the repository's copy of that document, `docs/original-api-doc.zh.md`, so a change to
the service that breaks them fails here. Only the example call at the end is ours (to pick the server and clip).
"""

import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import ROOT, wav_info

SEED_DOC = ROOT / "docs" / "original-api-doc.zh.md"


def printed_client(language: str) -> str:
    blocks = dict((lang, code) for lang, code in re.findall(r"```(\w+)\n(.*?)```", SEED_DOC.read_text("utf-8"), re.S)
                  if lang in ("python", "javascript"))
    return blocks[language]


def run_python_client(server_url, tmp_path, duration, fix_bufsize=False):
    code = printed_client("python")
    code, calls = re.subn(r"^asyncio\.run\(generate_music\(.*\)\)\s*$", "", code, flags=re.M)
    assert calls == 1  # only the document's example call is dropped
    if fix_bufsize:  # the README's one-line fix for clips over ~6 s
        code, fixes = re.subn(r"aiohttp\.ClientSession\(\)", "aiohttp.ClientSession(read_bufsize=2**24)", code)
        assert fixes == 1
    code += textwrap.dedent(f"""
        asyncio.run(generate_music("电子舞曲带有明亮的合成器和强烈的节拍", duration={duration},
                                   server_url={server_url!r}))
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_the_printed_python_client_saves_a_short_clip(idle_server, tmp_path):
    result = run_python_client(idle_server.url, tmp_path, duration=5)
    assert result.returncode == 0, result.stderr
    assert "开始生成音乐" in result.stdout and "生成进度" in result.stdout and "音乐生成完成" in result.stdout
    assert wav_info((tmp_path / "output" / "generated_music.wav").read_bytes())[:3] == (32000, 2, 1)


def test_the_printed_python_client_cannot_read_a_long_clip_without_the_one_line_fix(idle_server, tmp_path):
    # aiohttp's readline refuses lines over 512 KiB: a 15 s mono `completed` event is ~1.3 MB.
    result = run_python_client(idle_server.url, tmp_path, duration=15)
    assert result.returncode != 0 and "LineTooLong: 400, message:\n  Got more than 524288 bytes" in result.stderr


def test_the_python_client_with_read_bufsize_raised_saves_a_60_second_clip(idle_server, tmp_path):
    result = run_python_client(idle_server.url, tmp_path, duration=60, fix_bufsize=True)
    assert result.returncode == 0, result.stderr
    rate, width, channels, seconds = wav_info((tmp_path / "output" / "generated_music.wav").read_bytes())
    assert (rate, width, channels) == (32000, 2, 1) and abs(seconds - 60) < 1.2


# What a browser gives the printed JavaScript client and Node lacks: a download link to click.
# fetch is wrapped only to send the document's hard-coded http://localhost:5555 to the test server.
NODE_BROWSER_SHIM = """
const fs = require('fs');
const nodeFetch = globalThis.fetch;
globalThis.fetch = (url, options) => nodeFetch(url.replace('http://localhost:5555', process.env.SERVER_URL), options);
const blobs = new Map();
URL.createObjectURL = (blob) => { const id = `blob:${blobs.size}`; blobs.set(id, blob); return id; };
URL.revokeObjectURL = () => {};
globalThis.document = { createElement: () => ({ click() {
  blobs.get(this.href).arrayBuffer().then((data) => fs.writeFileSync(process.env.OUT_FILE, Buffer.from(data)));
} }) };
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_the_printed_javascript_client_downloads_the_clip(idle_server, tmp_path):
    out = tmp_path / "generated_music.wav"
    script = tmp_path / "client.js"
    script.write_text(NODE_BROWSER_SHIM + printed_client("javascript"), "utf-8")  # ends with generateMusic(..., 20)
    result = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=600,
                            env={"PATH": "/usr/bin:/bin:/usr/local/bin", "SERVER_URL": idle_server.url,
                                 "OUT_FILE": str(out)})
    assert result.returncode == 0 and not result.stderr, result.stderr
    assert "开始生成音乐" in result.stdout and "音乐生成完成" in result.stdout
    rate, width, channels, seconds = wav_info(out.read_bytes())
    assert (rate, width, channels) == (32000, 2, 1) and abs(seconds - 20) < 0.4
