#!/usr/bin/env python3
"""Generate music with the MusicGen service from the command line: progress bar on stderr, audio to a file.

Standard library only (Python 3.8+), so it can be copied anywhere; installed with the package as
`musicgen-generate`. Examples:

    musicgen-generate "lo-fi beat with mellow piano" --duration 10 -o beat.wav --url http://127.0.0.1:5555
    musicgen-generate "add drums and bass" --continue riff.flac --duration 20 -o song.mp3
    musicgen-generate "slow jazz" --duration 30 --stream -o jazz.wav    # play jazz.wav while it grows

Exit codes:
    0    the audio was saved
    1    server error: a 5xx answer, an `error` event (e.g. out of GPU memory), a broken stream
    2    bad request: invalid flags, or the server answered 400/413, or 401 (token missing or wrong)
    3    busy: the server answered 503 with Retry-After (after the --retry attempts, if any)
    4    network error: cannot connect, connection lost, or no data for --timeout seconds
    130  interrupted with Ctrl-C: the connection is closed, which cancels the generation on the server
"""

import argparse
import base64
import contextlib
import http.client
import json
import os
import struct
import sys
import time
import typing as tp
import urllib.parse

EXIT_OK, EXIT_SERVER, EXIT_BAD_REQUEST, EXIT_BUSY, EXIT_NETWORK, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
PATH = "/api/v1/generate_music"

# The request's optional fields: (name, type, server default, minimum, maximum, help). They mirror
# app.validation.GenerateParams (tests/test_cli.py checks they agree); this file must not import the app.
PARAMETERS = [
    ("duration", int, 30, 1, 60, "length of the clip in seconds"),
    ("mbd", bool, False, None, None, "decode with MultiBand Diffusion instead of the EnCodec decoder"),
    ("top_k", int, 250, 0, 2048, "sample from the k likeliest tokens (0 disables)"),
    ("top_p", float, 0.0, 0.0, 1.0, "nucleus sampling; when > 0 it overrides top_k"),
    ("temperature", float, 1.0, 0.0, 10.0, "softmax temperature; 0 is greedy decoding"),
    ("cfg_coef", float, 3.0, 0.0, 30.0, "classifier-free guidance coefficient"),
    ("seed", int, None, 0, 2**32 - 1, "same seed, same audio"),
    ("stream_audio", bool, None, None, None, "hear it while it is made: the output grows as the music arrives, a "
                                             "playable 16-bit WAV at every moment (a non-WAV output's growing WAV is "
                                             "OUTPUT.live.wav until the final file is saved); prints the time to "
                                             "first audio"),
]
FLAGS = {"stream_audio": "--stream"}  # where a flag is not the field's name
# Fields with a fixed set of values: (name, values, help); absent, the server decides.
CHOICES = [
    ("format", ("wav", "flac", "mp3", "ogg"), "the audio file's format (default: the extension of -o, else wav)"),
    ("normalization", ("loudness", "peak", "rms", "clip"), "how the clip's level is set (default: the server's)"),
]
# Audio files sent as base64: (field, flag, help).
AUDIO_FILES = [
    ("melody", "--melody", "an audio file (WAV, FLAC, Ogg, MP3) whose melody the clip follows (melody models)"),
    ("audio_prompt", "--continue", "an audio file the clip begins with and continues; --duration is the whole "
                                   "clip's length, at least 1 s longer"),
]
MAX_DESCRIPTION_CHARS = 2000


class Failure(Exception):
    """Ends the program with `code` after printing the message."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _ranged(kind: tp.Callable[[str], tp.Any], low: tp.Any, high: tp.Any) -> tp.Callable[[str], tp.Any]:
    def convert(text: str) -> tp.Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a valid {kind.__name__}: {text!r}") from None
        if not low <= value <= high:  # also rejects nan
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}")
        return value
    return convert


def parse_args(argv: tp.Optional[tp.Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="musicgen-generate", description="Generate music with a MusicGen service and save it as an audio file.",
        epilog="Exit codes: 0 saved, 1 server error, 2 bad request, 3 busy, 4 network error, 130 interrupted.")
    parser.add_argument("description", help=f"what the music should sound like (at most {MAX_DESCRIPTION_CHARS} "
                                            "characters)")
    for name, kind, default, low, high, text in PARAMETERS:
        flag = FLAGS.get(name, "--" + name.replace("_", "-"))
        if kind is bool:
            parser.add_argument(flag, dest=name, action="store_true", default=None, help=text)
        else:
            shown = "random" if default is None else default
            parser.add_argument(flag, dest=name, type=_ranged(kind, low, high), metavar=kind.__name__.upper(),
                                help=f"{text}; {low} to {high} (server default: {shown})")
    for name, values, text in CHOICES:
        parser.add_argument("--" + name, choices=values, help=text)
    for name, flag, text in AUDIO_FILES:
        parser.add_argument(flag, dest=name, metavar="FILE", help=text)
    parser.add_argument("-o", "--output", help="where to save the audio; `-` for stdout "
                                               "(default: musicgen-SEED.wav, or the --format's extension)")
    parser.add_argument("--url", default=os.environ.get("MUSICGEN_URL", "http://127.0.0.1:5555"),
                        help="the service (default: $MUSICGEN_URL or http://127.0.0.1:5555)")
    parser.add_argument("--token", default=os.environ.get("MUSICGEN_AUTH_TOKEN", ""),
                        help="the server's bearer token, where it has one (default: $MUSICGEN_AUTH_TOKEN; the "
                             "variable keeps it out of `ps` and shell history)")
    parser.add_argument("--retry", type=int, default=0, metavar="N",
                        help="when the server is busy, try again up to N times, waiting Retry-After seconds, "
                             "doubled after each attempt (default: 0)")
    parser.add_argument("--timeout", type=float, default=60, metavar="SECONDS",
                        help="give up when the server sends nothing for this long (default: 60; it sends a "
                             "keep-alive every 0.5 s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr, only errors")
    args = parser.parse_args(argv)
    if not args.description.strip():
        parser.error("the description must not be empty")
    if args.retry < 0:
        parser.error("--retry must be 0 or more")
    extension = os.path.splitext(args.output or "")[1].lower().lstrip(".")
    formats = CHOICES[0][1]
    if args.format is None and extension in formats:
        args.format = extension
    elif args.format is not None and extension and extension != args.format and args.output != "-":
        parser.error(f"--format {args.format} but the output file ends in .{extension}")
    if args.stream_audio and args.output == "-":
        parser.error("--stream writes a file that grows: not with -o -")
    for name, flag, _ in AUDIO_FILES:
        if getattr(args, name) is not None and not os.path.isfile(getattr(args, name)):
            parser.error(f"{flag}: no such file: {getattr(args, name)}")
    return args


def request_body(args: argparse.Namespace) -> tp.Dict[str, tp.Any]:
    """The flags given, audio files as base64; the server applies its own defaults to the rest."""
    body: tp.Dict[str, tp.Any] = {"description": args.description}
    names = [name for name, *_ in PARAMETERS] + [name for name, *_ in CHOICES]
    body.update({name: getattr(args, name) for name in names if getattr(args, name) is not None})
    for name, _, _ in AUDIO_FILES:
        path = getattr(args, name)
        if path is not None:
            with open(path, "rb") as f:
                body[name] = base64.b64encode(f.read()).decode("ascii")
    return body


class ProgressBar:
    """A redrawn bar on a terminal; one line per 10% elsewhere (logs, CI); nothing when quiet."""

    def __init__(self, stream: tp.TextIO, quiet: bool):
        self.stream = stream
        self.quiet = quiet
        self.tty = stream.isatty()
        self.shown = -1.0

    def update(self, percent: float) -> None:
        if self.quiet:
            return
        if self.tty:
            filled = int(percent * 0.3)
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {percent:5.1f}%")
            self.stream.flush()
        elif int(percent // 10) > int(self.shown // 10) or (percent >= 100 > self.shown):
            self.stream.write(f"progress {percent:.1f}%\n")
            self.stream.flush()
        self.shown = percent

    def end(self) -> None:
        if self.tty and self.shown >= 0 and not self.quiet:
            self.stream.write("\n")
            self.shown = -1.0


class GrowingWav:
    """A 16-bit PCM WAV file written as chunks arrive; its header is rewritten after each, so the file is a whole,
    playable WAV of everything so far at every moment (opened per chunk: nothing is held between them)."""

    def __init__(self, path: str, rate: int, channels: int):
        self.path, self.rate, self.channels = path, rate, channels
        self.size = 0
        with open(path, "wb") as f:
            self._header(f)

    def append(self, pcm: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(44 + self.size)
            f.write(pcm)
            self.size += len(pcm)
            self._header(f)

    def _header(self, f: tp.BinaryIO) -> None:
        block = 2 * self.channels
        f.seek(0)
        f.write(b"RIFF" + struct.pack("<I", 36 + self.size) + b"WAVEfmt "
                + struct.pack("<IHHIIHH", 16, 1, self.channels, self.rate, self.rate * block, block, 16)
                + b"data" + struct.pack("<I", self.size))


class Live:
    """`--stream`: the `audio` events into a growing WAV, checked to follow each other; says when audio begins."""

    def __init__(self, args: argparse.Namespace, bar: ProgressBar, started: float):
        self.args, self.bar, self.started = args, bar, started
        self.wav: tp.Optional[GrowingWav] = None
        self.final = ""  # where the completed file goes
        self.expected = (0, -1)  # (seq, first sample) the next chunk must have; -1: any (the first one)

    def begin(self, start: tp.Dict[str, tp.Any]) -> None:
        self.final = path = output_path(self.args, start)
        if start.get("format", "wav") != "wav":
            path += ".live.wav"
        try:
            self.wav = GrowingWav(path, int(start.get("sample_rate", 32000)), int(start.get("channels", 1)))
        except OSError as e:
            raise Failure(EXIT_BAD_REQUEST, f"cannot write {path}: {e}") from None

    def add(self, event: tp.Dict[str, tp.Any]) -> None:
        wav = self.wav
        if wav is None:
            raise ValueError("an audio event before the start event")
        pcm = base64.b64decode(event["pcm"])
        first = round(float(event["start"]) * wav.rate)
        seq, expected = self.expected
        if event.get("seq") != seq or expected not in (-1, first) or len(pcm) % (2 * wav.channels):
            raise ValueError(f"audio chunk {event.get('seq')} does not follow chunk {seq - 1}")
        if seq == 0:
            self.bar.end()
            say(self.args, f"first audio after {time.monotonic() - self.started:.1f} s: {wav.path} grows as the "
                           "music is made")
        wav.append(pcm)
        self.expected = (seq + 1, first + len(pcm) // (2 * wav.channels))

    def close(self, saved: bool) -> None:
        """Close the growing file; it goes once the final file is saved elsewhere, or if no final file came."""
        if self.wav is None:
            return
        if not saved or self.wav.path != self.final:
            with contextlib.suppress(OSError):
                os.unlink(self.wav.path)
        self.wav = None


def say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def events(response: http.client.HTTPResponse) -> tp.Iterator[tp.Dict[str, tp.Any]]:
    """The `data:` events of an SSE stream; comment messages (keep-alives) are skipped."""
    lines: tp.List[str] = []
    while True:
        raw = response.readline()
        if not raw:
            return
        line = raw.decode("utf-8").rstrip("\r\n")
        if line:
            lines.append(line)
            continue
        message, lines = lines, []
        for item in message:
            if item.startswith("data:"):
                yield json.loads(item[5:].strip())


def _answer_message(response: http.client.HTTPResponse) -> str:
    text = response.read(65536).decode("utf-8", "replace")
    try:
        return json.loads(text)["message"]
    except (ValueError, KeyError, TypeError):
        return text.strip()[:500] or response.reason


def attempt(args: argparse.Namespace, bar: ProgressBar, body: bytes,
            live: tp.Optional[Live] = None) -> tp.Tuple[tp.Optional[float], tp.Dict[str, tp.Any]]:
    """One request: (None, completed event), or (seconds to wait, {}) when busy; raises Failure otherwise.
    With `live` (--stream), the audio events go to its growing file."""
    url = urllib.parse.urlsplit(args.url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise Failure(EXIT_BAD_REQUEST, f"--url must be http(s)://host[:port], not {args.url!r}")
    kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    conn = kind(url.hostname, url.port, timeout=args.timeout)
    try:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if args.token:
            headers["Authorization"] = f"Bearer {args.token}"
        # A server may answer before it has read the whole body (413, 401) and close: its answer is waiting.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.request("POST", url.path.rstrip("/") + PATH, body=body, headers=headers)
        response = conn.getresponse()
        if response.status == 401:
            hint = "wrong --token" if args.token else "this server needs a token: set MUSICGEN_AUTH_TOKEN or --token"
            raise Failure(EXIT_BAD_REQUEST, f"unauthorized (401): {hint}")
        if response.status == 503 and response.getheader("Retry-After") is not None:
            retry_after = response.getheader("Retry-After", "")
            say(args, f"busy: {_answer_message(response)}")
            return float(retry_after) if retry_after.isdigit() else 5.0, {}
        if 400 <= response.status < 500:  # 400 invalid, 413 too large; 404/405: --url is wrong
            raise Failure(EXIT_BAD_REQUEST, f"bad request ({response.status}): {_answer_message(response)}")
        if response.status != 200:
            raise Failure(EXIT_SERVER, f"server error ({response.status}): {_answer_message(response)}")
        for event in events(response):
            if event.get("event") == "start":
                say(args, f"generating {event.get('duration', '?')} s, seed {event.get('seed', '?')}{_inputs(event)}")
                if live is not None:
                    live.begin(event)
            elif event.get("event") == "audio" and live is not None:
                live.add(event)
            elif event.get("event") == "progress":
                bar.update(float(event.get("progress", 0)))
            elif event.get("event") == "completed":
                bar.update(100.0)
                bar.end()
                return None, event
            elif event.get("event") == "error":
                bar.end()
                raise Failure(EXIT_SERVER, f"generation failed: {event.get('message', 'unknown error')}")
        raise Failure(EXIT_NETWORK, "the connection closed before the generation finished")
    except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, garbled
        bar.end()
        raise Failure(EXIT_NETWORK, f"network error talking to {args.url}: {e or type(e).__name__}") from None
    except (ValueError, KeyError, TypeError) as e:  # a data: line that is not JSON, an audio event out of order
        raise Failure(EXIT_SERVER, f"server sent a malformed event: {e}") from None
    finally:
        conn.close()  # also what cancels the generation when we leave early (Ctrl-C)


def _inputs(start: tp.Dict[str, tp.Any]) -> str:
    """What the start event says of the audio inputs, e.g. ` (continuing 4.0 s of audio, following a melody)`."""
    said = []
    if isinstance(start.get("audio_prompt"), dict):
        said.append(f"continuing {start['audio_prompt'].get('seconds', '?')} s of audio")
    if isinstance(start.get("melody"), dict):
        said.append(f"following a {start['melody'].get('seconds', '?')} s melody")
    return f" ({', '.join(said)})" if said else ""


def output_path(args: argparse.Namespace, event: tp.Dict[str, tp.Any]) -> str:
    """-o, or a name from the seed and format that `start` and `completed` both carry."""
    return args.output or f"musicgen-{event.get('seed', 'clip')}.{event.get('format', 'wav')}"


def save(args: argparse.Namespace, event: tp.Dict[str, tp.Any]) -> str:
    audio = base64.b64decode(event["audio"])
    if args.output == "-":
        sys.stdout.buffer.write(audio)
        sys.stdout.buffer.flush()
        return "stdout"
    path = output_path(args, event)
    partial = path + ".part"  # never leave a half-written file under the real name
    with open(partial, "wb") as f:
        f.write(audio)
    os.replace(partial, path)
    return path


def run(args: argparse.Namespace) -> int:
    bar = ProgressBar(sys.stderr, args.quiet)
    try:
        body = json.dumps(request_body(args)).encode()
    except OSError as e:
        raise Failure(EXIT_BAD_REQUEST, f"cannot read an audio file: {e}") from None
    for attempt_number in range(args.retry + 1):
        live, where = Live(args, bar, time.monotonic()) if args.stream_audio else None, ""
        try:
            wait, completed = attempt(args, bar, body, live)
            if wait is None:
                where = save(args, completed)
        finally:
            if live is not None:
                live.close(saved=bool(where))
        if wait is None:
            channels = {1: "mono", 2: "stereo"}.get(completed.get("channels"), "?")
            say(args, f"saved {where} ({completed.get('format', 'wav').upper()}, {completed.get('duration', '?')} s, "
                      f"{completed.get('sample_rate', '?')} Hz, {channels}, seed {completed.get('seed', '?')})")
            return EXIT_OK
        if attempt_number < args.retry:
            delay = min(wait * 2 ** attempt_number, 300)
            say(args, f"retrying in {delay:g} s ({attempt_number + 1}/{args.retry})")
            time.sleep(delay)
    raise Failure(EXIT_BUSY, "the server is busy with another generation; try again later (or use --retry)")


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except Failure as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        # The connection is already closed (attempt's finally): the server stops within 2 s.
        print("\ninterrupted: the generation was cancelled", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
