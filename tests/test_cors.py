"""Pages of other origins (CORS, docs/API.md "Browsers on other origins"): headers through real servers, then
Debian's Chromium running pages served by a second local HTTP server, directly and through the shipped nginx site.

The browser tests skip as tests/test_web.py does (node, playwright-core or Chromium missing), the nginx half of
them as tests/test_nginx.py does.
"""

import contextlib
import functools
import http.server
import json
import re
import socket
import subprocess
import threading
import time
import typing as tp
from pathlib import Path

import pytest
import requests

from app import create_app
from app.config import ConfigError, Settings
from app.cors import MAX_AGE_SECONDS
from tests.helpers import Server, events, free_port, generate, wav_info
from tests.test_clients import printed_client
from tests.test_generation import FakeModel
from tests.test_nginx import NGINX, SITE, Nginx
from tests.test_operations import scrape
from tests.test_web import BROWSER_DIR, _missing

ELSEWHERE = "http://page.example:8080"  # an origin no server here lists
GENERATE = "/api/v1/generate_music"
browser = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def post(url: str, body: tp.Any, **headers: str) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body)
    return requests.post(url + GENERATE, data=data, headers={"Content-Type": "application/json", **headers},
                         stream=True, timeout=600)


def preflight(url: str, origin: str = ELSEWHERE, method: str = "POST",
              headers: str = "authorization,content-type", path: str = GENERATE) -> requests.Response:
    """What Chromium sends before a cross-origin fetch with a JSON body and a token."""
    return requests.options(url + path, timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": headers})


def cors_headers(response: requests.Response) -> tp.Dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")}


def requests_total(url: str) -> tp.Dict[str, float]:
    samples = scrape(requests.get(url + "/metrics", timeout=10).text)
    return {labels[0][1]: value for (name, labels), value in samples.items() if name == "musicgen_requests_total"}


@contextlib.contextmanager
def slot_held(url: str) -> tp.Iterator[None]:
    """A generation streams (its `start` read) until the block ends; leaving closes it, which cancels it."""
    with generate(url, {"description": "holding the slot", "duration": 60, "mbd": True}) as holder:
        assert holder.status_code == 200
        stream = events(holder)  # held: a dropped generator would close the connection, which cancels the job
        assert next(stream)["event"] == "start"
        yield


def log_lines(server: Server, pattern: str) -> int:
    return len(re.findall(pattern, Path(server.log_path).read_text(errors="replace")))


def wait_for_log(server: Server, pattern: str, count: int, within: float = 30) -> None:
    """gunicorn logs a request once its answer has ended."""
    deadline = time.monotonic() + within
    while log_lines(server, pattern) < count:
        assert time.monotonic() < deadline, f"{pattern!r} not logged {count} times:\n{server.output()}"
        time.sleep(0.1)


# --- The setting ----------------------------------------------------------------------------------------------

def test_origins_setting_is_star_or_exact_origins():
    assert Settings().allowed_origins == ("*",)
    listed = Settings.from_env({"MUSICGEN_CORS_ORIGINS": "https://app.example.com, http://localhost:3000 "
                                                         "http://[::1]:8000"})
    assert listed.allowed_origins == ("https://app.example.com", "http://localhost:3000", "http://[::1]:8000")
    for wrong in ("https://app.example.com/", "app.example.com", "https://*.example.com", "*, https://a.example",
                  "https://a.example/path", " , "):
        with pytest.raises(ConfigError, match="MUSICGEN_CORS_ORIGINS"):
            Settings(cors_origins=wrong)


# --- Headers through a real server ----------------------------------------------------------------------------

def assert_any_origin(response: requests.Response, what: str) -> None:
    headers = cors_headers(response)
    assert headers.get("Access-Control-Allow-Origin") == "*", (what, response.status_code, headers)
    assert headers.get("Access-Control-Expose-Headers") == "Retry-After", what
    assert "Access-Control-Allow-Credentials" not in headers, what


def test_every_kind_of_answer_carries_the_header(idle_server):
    url = idle_server.url
    with post(url, {"description": "cors", "duration": 1}, Origin=ELSEWHERE) as stream:
        assert stream.status_code == 200 and [e["event"] for e in events(stream)][-1] == "completed"
    assert_any_origin(stream, "stream")
    with slot_held(url):
        busy = post(url, {"description": "second"}, Origin=ELSEWHERE)
    assert busy.status_code == 503 and int(busy.headers["Retry-After"]) > 0
    assert_any_origin(busy, "busy")
    answers = {
        "400": post(url, b"{not json", Origin=ELSEWHERE),
        "413": post(url, b"x" * (16 * 2**20 + 1), Origin=ELSEWHERE),
        "404": requests.get(url + "/nowhere", headers={"Origin": ELSEWHERE}, timeout=10),
        "405": requests.get(url + GENERATE, headers={"Origin": ELSEWHERE}, timeout=10),
        "health": requests.get(url + "/health", headers={"Origin": ELSEWHERE}, timeout=10),
        "api health": requests.get(url + "/api/v1/health", headers={"Origin": ELSEWHERE}, timeout=10),
        "openapi": requests.get(url + "/api/v1/openapi.json", headers={"Origin": ELSEWHERE}, timeout=10),
        "page": requests.get(url + "/", headers={"Origin": ELSEWHERE}, timeout=10),
        "no Origin (curl)": requests.get(url + "/health", timeout=10),
    }
    for what, response in answers.items():
        expected = {"400": 400, "413": 413, "404": 404, "405": 405}.get(what, 200)
        assert response.status_code == expected, (what, response.text)
        assert_any_origin(response, what)
        if expected != 200:
            assert response.json()["event"] == "error", what


def test_preflight_is_answered_at_once_without_the_slot_and_is_not_a_request(idle_server):
    url = idle_server.url
    before = requests_total(url)
    preflights = log_lines(idle_server, r'"OPTIONS /api/v1/generate_music HTTP/1.1" 204')
    answer = preflight(url)
    assert answer.status_code == 204 and answer.content == b"" and "Content-Type" not in answer.headers
    assert cors_headers(answer) == {
        "Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": "GET, POST",
        "Access-Control-Allow-Headers": "authorization, content-type",
        "Access-Control-Max-Age": str(MAX_AGE_SECONDS), "Access-Control-Expose-Headers": "Retry-After"}
    assert idle_server.health()["status"] == "ready"  # it took nothing
    with slot_held(url):
        for _ in range(3):
            assert preflight(url).status_code == 204  # not 503: a preflight never asks for the slot
        assert post(url, {"description": "refused"}, Origin=ELSEWHERE).status_code == 503
    idle_server.wait(timeout=10)
    after = requests_total(url)
    # The holder counts as cancelled and the refused POST as busy; the four preflights count nowhere.
    assert {k: after[k] - before[k] for k in after} == {
        "completed": 0, "error": 0, "cancelled": 1, "busy": 1, "invalid": 0, "unauthorized": 0}
    wait_for_log(idle_server, r'"OPTIONS /api/v1/generate_music HTTP/1.1" 204', preflights + 4)
    # What the allowed methods and headers leave out is not allowed.
    assert "Access-Control-Allow-Methods" not in preflight(url, method="PUT").headers
    assert preflight(url, headers="content-type,x-other").headers["Access-Control-Allow-Headers"] == "content-type"
    assert preflight(url, path="/nowhere").status_code == 404


def test_the_openapi_document_describes_what_the_server_answers(idle_server):
    document = requests.get(idle_server.url + "/api/v1/openapi.json", timeout=10).json()
    documented = document["paths"][GENERATE]["options"]["responses"]["204"]["headers"]
    answer = preflight(idle_server.url)
    assert set(cors_headers(answer)) - {"Access-Control-Expose-Headers"} == set(documented)
    assert documented["Access-Control-Allow-Methods"]["schema"]["const"] == answer.headers[
        "Access-Control-Allow-Methods"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                assert "Access-Control-Allow-Origin" in response["headers"], (path, method, status)
    assert document["components"]["headers"]["Access-Control-Expose-Headers"]["schema"]["const"] == answer.headers[
        "Access-Control-Expose-Headers"]


def test_a_500_and_a_failed_model_carry_it_too():
    """Answers no real server gives on demand, from the app in-process."""
    def cannot_load() -> FakeModel:
        raise RuntimeError("no weights")

    app = create_app(Settings(model="fake"), load_model=cannot_load)
    app.add_url_rule("/boom", "boom", lambda: 1 / 0)
    client = app.test_client()
    try:
        deadline = time.monotonic() + 10
        while app.extensions["musicgen"].state != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        failed = client.post(GENERATE, json={"description": "x"}, headers={"Origin": ELSEWHERE})
        assert failed.status_code == 503 and "Retry-After" not in failed.headers
        boom = client.get("/boom", headers={"Origin": ELSEWHERE})
        assert boom.status_code == 500 and boom.json == {"event": "error", "message": "internal server error"}
        for response in (failed, boom):
            assert response.headers["Access-Control-Allow-Origin"] == "*"
    finally:
        app.extensions["musicgen"].stop()


# --- Servers and pages for the rest ---------------------------------------------------------------------------

class Pages:
    """A second local HTTP server: its own origin, serving the test's pages from a directory."""

    def __init__(self, directory: Path):
        self.directory = directory
        handler = functools.partial(QuietHandler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.origin = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: tp.Any) -> None:
        pass


PAGE = '<!doctype html>\n<meta charset="utf-8">\n<link rel="icon" href="data:,">\n<title>{title}</title>\n{body}\n'


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> tp.Iterator[tp.Tuple[Pages, Pages]]:
    """Two page servers (two origins) sharing one directory of pages."""
    directory = tmp_path_factory.mktemp("pages")
    (directory / "blank.html").write_text(PAGE.format(title="a page of another origin", body=""))
    servers = (Pages(directory), Pages(directory))
    yield servers
    for s in servers:
        s.close()


def client_page(pages: Pages, api_url: str) -> str:
    """The original document's JavaScript client, verbatim but for its server URL, as a page of `pages`."""
    code = printed_client("javascript")  # ends with its own example call: generateMusic('...', 20)
    assert code.count("'http://localhost:5555'") == 1
    code = code.replace("'http://localhost:5555'", json.dumps(api_url))
    name = f"client-{api_url.rsplit(':', 1)[1]}.html"
    (pages.directory / name).write_text(
        PAGE.format(title="the original client", body=f"<script>\n{code}</script>"), "utf-8")
    return f"{pages.origin}/{name}"


@pytest.fixture(scope="module")
def token_server():
    with Server({"MUSICGEN_AUTH_TOKEN": "page-token"}) as s:
        s.wait()
        yield s


@pytest.fixture(scope="module")
def listed_server(pages):
    """Only the first page server's origin (and one that is not here) is listed."""
    with Server({"MUSICGEN_CORS_ORIGINS": f"https://app.example.com,{pages[0].origin}"}) as s:
        s.wait()
        yield s


@pytest.fixture(params=["direct", "nginx"])
def front(request, tmp_path):
    """url_of(server): the server's own URL, or that of the shipped nginx site in front of it."""
    started: tp.List[Nginx] = []

    def url_of(server: Server) -> str:
        if request.param == "direct":
            return server.url
        if NGINX is None:
            pytest.skip("nginx is not installed (scripts/test installs it)")
        directory = tmp_path / f"nginx{len(started)}"
        directory.mkdir()
        started.append(Nginx(directory, [server.port]).start())
        return started[-1].url

    yield url_of
    for n in started:
        n.stop()


def in_browser(*args: str) -> tp.Dict[str, tp.Any]:
    done = subprocess.run(["node", str(BROWSER_DIR / "cross_origin.js"), *args], capture_output=True, text=True,
                          timeout=300, cwd=BROWSER_DIR)
    assert done.returncode == 0, f"cross_origin.js failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def fetch_from(page_url: str, *requests_: tp.Dict[str, tp.Any]) -> tp.Dict[str, tp.Any]:
    return in_browser("fetch", page_url, json.dumps(requests_))


# --- Headers of a listed origin, of others, and with a token ---------------------------------------------------

def test_a_list_answers_its_origins_only(listed_server, pages):
    url = listed_server.url
    for origin in ("https://app.example.com", pages[0].origin):
        answer = preflight(url, origin=origin)
        assert answer.status_code == 204
        assert answer.headers["Access-Control-Allow-Origin"] == origin and answer.headers["Vary"] == "Origin"
        assert requests.get(url + "/health", headers={"Origin": origin}, timeout=10).headers[
            "Access-Control-Allow-Origin"] == origin
    for origin in (pages[1].origin, "https://app.example.com.evil.example", "http://app.example.com", None):
        headers = {"Origin": origin} if origin else {}
        answers = [preflight(url, origin=origin) if origin else requests.options(url + GENERATE, timeout=10),
                   requests.get(url + "/health", headers=headers, timeout=10),
                   post(url, {"description": ""}, **headers)]
        assert [a.status_code for a in answers] == [204 if origin else 200, 200, 400]  # answered as usual...
        assert all(cors_headers(a) == {} for a in answers), origin  # ...with nothing a browser would pass on


def test_with_a_token_the_preflight_needs_none_and_the_401_is_readable(token_server):
    url = token_server.url
    before = requests_total(url)
    answer = preflight(url)
    assert answer.status_code == 204 and answer.headers["Access-Control-Allow-Origin"] == "*"
    assert "authorization" in answer.headers["Access-Control-Allow-Headers"]
    refused = post(url, {"description": "no token"}, Origin=ELSEWHERE)
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert refused.headers["Access-Control-Allow-Origin"] == "*"
    after = requests_total(url)
    assert after["unauthorized"] - before["unauthorized"] == 1  # the POST; not the preflight


# --- In Chromium, on pages of another origin ------------------------------------------------------------------

@browser
def test_the_original_javascript_client_on_another_origin_saves_the_wav(idle_server, pages, front, tmp_path):
    api = front(idle_server)
    out = tmp_path / "generated_music.wav"
    result = in_browser("client", client_page(pages[1], api), str(out))
    assert result["origin"] == pages[1].origin != api
    assert result["errors"] == [], result
    assert "开始生成音乐..." in result["log"] and "音乐生成完成！" in result["log"]
    assert result["downloadName"] == "generated_music.wav"
    rate, width, channels, seconds = wav_info(out.read_bytes())
    assert (rate, width, channels) == (32000, 2, 1) and abs(seconds - 20) < 0.4


@browser
def test_a_page_on_another_origin_sends_the_token_and_generates(token_server, pages, front):
    api = front(token_server)
    body = json.dumps({"description": "from another page", "duration": 1})
    request = {"url": api + GENERATE, "method": "POST", "body": body}
    without, wrong, right = fetch_from(
        f"{pages[1].origin}/blank.html",
        {**request, "headers": {"Content-Type": "application/json"}},
        {**request, "headers": {"Content-Type": "application/json", "Authorization": "Bearer nope"}},
        {**request, "headers": {"Content-Type": "application/json", "Authorization": "Bearer page-token"}},
    )["results"]
    for refused in (without, wrong):  # the page reads why
        assert refused["status"] == 401 and "bearer token" in refused["message"], refused
    assert right["status"] == 200 and right["contentType"].startswith("text/event-stream"), right
    assert right["events"][0] == "start" and right["events"][-1] == "completed"
    assert right["audioBytes"] == 44 + 32000 * 2


@browser
def test_a_page_on_another_origin_reads_a_busy_answer(idle_server, pages, front):
    api = front(idle_server)
    request = {"url": api + GENERATE, "method": "POST", "headers": {"Content-Type": "application/json"}}
    first, busy = fetch_from(  # the page itself keeps the server busy, then asks again
        f"{pages[1].origin}/blank.html",
        {**request, "body": json.dumps({"description": "first", "duration": 60, "mbd": True}), "hold": True},
        {**request, "body": json.dumps({"description": "second in line"})})["results"]
    assert first == {"status": 200, "held": True}
    assert busy["status"] == 503 and busy["message"] == "another generation is running; try again later", busy
    assert busy["retryAfter"] == "5"  # exposed: without Access-Control-Expose-Headers the page would see null


@browser
def test_a_page_of_an_origin_not_listed_is_refused_by_the_browser(listed_server, pages, front, tmp_path):
    api = front(listed_server)
    posts = log_lines(listed_server, r'"POST /api/v1/generate_music ')
    refused = in_browser("client", client_page(pages[1], api), str(tmp_path / "never.wav"))
    assert refused["downloadName"] is None and not (tmp_path / "never.wav").exists()
    assert any("blocked by CORS policy" in e for e in refused["errors"]), refused["errors"]
    assert any(e.startswith("请求失败:") for e in refused["errors"]), refused["errors"]
    # The browser stopped at the preflight: the POST was never sent.
    assert log_lines(listed_server, r'"POST /api/v1/generate_music ') == posts

    # The listed origin, same server: allowed.
    listed = fetch_from(f"{pages[0].origin}/blank.html", {
        "url": api + GENERATE, "method": "POST", "headers": {"Content-Type": "application/json"},
        "body": json.dumps({"description": "listed", "duration": 1})})["results"][0]
    assert listed["status"] == 200 and listed["events"][-1] == "completed", listed


@browser
def test_only_the_token_stops_a_simple_post_from_a_page_not_listed(listed_server, token_server, pages):
    """README: what protects a private service is the token, not the list. A text/plain POST needs no
    preflight: the page cannot read the answer, but the generation was accepted and started."""
    page = f"{pages[1].origin}/blank.html"
    simple = {"method": "POST", "body": json.dumps({"description": "simple", "duration": 1})}  # text/plain
    accepted = rf'"POST /api/v1/generate_music HTTP/1.1" 200 \d+ "{re.escape(pages[1].origin)}/'
    before = log_lines(listed_server, accepted)
    result = fetch_from(page, {"url": listed_server.url + GENERATE, **simple}, {"url": token_server.url + GENERATE,
                                                                                   **simple})
    unreadable, refused = result["results"]
    assert unreadable == {"error": "TypeError: Failed to fetch"}, result
    wait_for_log(listed_server, accepted, before + 1)  # ...the server took it (and the slot) all the same
    assert refused["status"] == 401, refused  # with a token: refused before any work


# --- nginx's own errors ---------------------------------------------------------------------------------------

def body_limit() -> int:
    size = re.search(r"client_max_body_size (\d+)([km]?);", SITE.read_text())
    assert size, "no client_max_body_size in the shipped site"
    return int(size[1]) * {"": 1, "k": 1024, "m": 1024 ** 2}[size[2]]


@browser
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (scripts/test installs it)")
def test_nginx_own_errors_are_readable_by_a_page_of_another_origin(idle_server, pages, tmp_path):
    started = []

    def site(backend: int, **replace: str) -> str:
        directory = tmp_path / f"nginx{len(started)}"
        directory.mkdir()
        started.append(Nginx(directory, [backend], replace).start())
        return started[-1].url

    try:
        proxy = site(idle_server.port)
        nobody = site(free_port())
        with socket.socket() as mute:  # accepts connections, never answers
            mute.bind(("127.0.0.1", 0))
            mute.listen(8)
            slow = site(mute.getsockname()[1], **{"proxy_read_timeout 75s;": "proxy_read_timeout 1s;"})
            json_post = {"method": "POST", "headers": {"Content-Type": "application/json"}}
            simple_post = {"method": "POST", "body": '{"description": "anyone?"}'}  # no preflight to fail first
            results = fetch_from(
                f"{pages[1].origin}/blank.html",
                {"url": proxy + GENERATE, **json_post, "bodyBytes": body_limit() + 1},
                {"url": proxy + "/metrics", "method": "GET"},
                {"url": nobody + GENERATE, **simple_post},
                {"url": slow + GENERATE, **simple_post})["results"]
    finally:
        for n in started:
            n.stop()
    too_large, forbidden, unreachable, timed_out = results
    assert too_large["status"] == 413 and "too large" in too_large["message"], too_large
    assert forbidden == {**forbidden, "status": 403, "message": "forbidden"}
    assert unreachable["status"] == 502 and "no generation backend" in unreachable["message"], unreachable
    assert timed_out["status"] == 504 and "did not answer" in timed_out["message"], timed_out
