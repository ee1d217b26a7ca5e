// The try-it page: builds the form from the OpenAPI document (the validator's own defaults and ranges),
// POSTs with fetch and reads the Server-Sent Events from the response body, as the original document's
// JavaScript client does. Cancel aborts the fetch; the server notices the closed connection and stops.
// With "Play while it is made" (stream_audio) the `audio` events are played as they arrive (Web Audio).
'use strict';

const API = '/api/v1/generate_music';
const BASIC = ['duration', 'mbd', 'stream_audio']; // everything else goes under "Advanced settings"
const AUDIO_FIELDS = ['melody', 'audio_prompt']; // audio files: their own pickers (index.html), not form fields
const LABELS = {
  duration: 'Duration (seconds)', mbd: 'MultiBand Diffusion decoder', top_k: 'Top-k', top_p: 'Top-p',
  temperature: 'Temperature', cfg_coef: 'Guidance (cfg_coef)', seed: 'Seed', format: 'Audio format',
  normalization: 'Normalization', stream_audio: 'Play while it is made',
};
// Where the page's default differs from the API's: hearing the music early is the point of trying it here.
const PAGE_DEFAULTS = { stream_audio: true };
const LEAD_SECONDS = 0.1; // the first chunk (or one after the music ran dry) starts this far ahead
const MIME_TYPES = { wav: 'audio/wav', flac: 'audio/flac', mp3: 'audio/mpeg', ogg: 'audio/ogg' };

const TOKEN_KEY = 'musicgen-token'; // sessionStorage: the token lives as long as the tab
const $ = (id) => document.getElementById(id);
let schema = null; // GenerateParams from the OpenAPI document
let controller = null; // AbortController of the running request
let audioUrl = null;
let live = null; // the LivePlayer of the running or last generation

function setState(state) {
  document.body.dataset.state = state; // idle, running, done, error, busy, unauthorized, cancelled (tests wait on it)
}

// A field's JSON Schema, with `anyOf: [X, {type: null}]` (optional values such as seed) unwrapped.
function unwrap(prop) {
  const variant = (prop.anyOf || []).find((s) => s.type !== 'null');
  return variant ? { ...prop, ...variant, optional: true } : prop;
}

function hint(prop) {
  const parts = [];
  if (prop.type === 'boolean' || prop.enum) return ''; // the control shows its default; the description says it
  if (prop.default !== undefined && prop.default !== null) parts.push(`Default ${prop.default}`);
  else if (prop.optional) parts.push('Empty: random');
  if (prop.minimum !== undefined && prop.maximum !== undefined) parts.push(`range ${prop.minimum}–${prop.maximum}`);
  return parts.join(', ') + '.';
}

function buildField(name, raw) {
  const prop = unwrap(raw);
  const box = document.createElement('div');
  box.className = 'field';
  const label = document.createElement('label');
  const input = document.createElement('input');
  input.id = input.name = name;
  input.dataset.type = prop.type;
  if (prop.enum) {
    const select = document.createElement('select');
    select.id = select.name = name;
    if (prop.optional) select.append(new Option('default', '')); // left out of the request: the server decides
    for (const value of prop.enum) select.append(new Option(value, value));
    select.value = prop.default ?? '';
    label.htmlFor = name;
    label.textContent = LABELS[name] || prop.title || name;
    box.append(label, select);
  } else if (prop.type === 'boolean') {
    box.classList.add('checkbox');
    box.id = `${name}-box`;
    input.type = 'checkbox';
    input.checked = (PAGE_DEFAULTS[name] ?? prop.default) === true;
    input.dataset.optional = prop.optional ? 'yes' : ''; // an optional flag left off is left out
    label.append(input, LABELS[name] || prop.title || name);
    box.append(label);
  } else {
    input.type = 'number';
    input.inputMode = prop.type === 'integer' ? 'numeric' : 'decimal';
    input.step = prop.type === 'integer' ? '1' : 'any';
    if (prop.minimum !== undefined) input.min = prop.minimum;
    if (prop.maximum !== undefined) input.max = prop.maximum;
    if (prop.default !== undefined && prop.default !== null) input.value = prop.default;
    if (prop.optional) input.placeholder = 'random';
    label.htmlFor = name;
    label.textContent = LABELS[name] || prop.title || name;
    box.append(label, input);
  }
  const small = document.createElement('small');
  small.className = 'hint';
  small.textContent = [prop.description || raw.description, hint(prop)].filter(Boolean).join(' ');
  box.append(small);
  return box;
}

async function loadForm() {
  const response = await fetch('/api/v1/openapi.json');
  if (!response.ok) throw new Error(`HTTP ${response.status}`);
  schema = (await response.json()).components.schemas.GenerateParams;
  const description = schema.properties.description;
  $('description').maxLength = description.maxLength;
  for (const [name, prop] of Object.entries(schema.properties)) {
    if (name === 'description' || AUDIO_FIELDS.includes(name)) continue;
    $(BASIC.includes(name) ? 'basic' : 'advanced').append(buildField(name, prop));
  }
}

// The request body: what the form says; an empty field is left out (the server's default). Audio files go
// as data: URLs (base64 with a prefix the server accepts).
async function body() {
  const params = { description: $('description').value };
  for (const input of document.querySelectorAll('.fields input')) {
    if (input.type === 'checkbox') {
      if (input.checked || !input.dataset.optional) params[input.name] = input.checked;
    }
    else if (input.value !== '') params[input.name] = Number(input.value);
  }
  for (const select of document.querySelectorAll('.fields select')) {
    if (select.value !== '') params[select.name] = select.value;
  }
  for (const name of AUDIO_FIELDS) {
    const file = $(name).files[0];
    if (file && !$(`${name}-box`).hidden) params[name] = await readAsDataUrl(file);
  }
  return params;
}

class InputFileError extends Error {}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new InputFileError(`Could not read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

// A file picker that also takes a dropped file, and says which file it holds.
function setUpDrop(box) {
  const input = box.querySelector('input[type="file"]');
  const clear = box.querySelector('button.clear');
  const update = () => {
    const file = input.files[0];
    box.querySelector('.chosen').textContent = file ? `${file.name} (${Math.ceil(file.size / 1024)} KB)` : '';
    clear.hidden = !file;
  };
  input.addEventListener('change', update);
  clear.addEventListener('click', () => { input.value = ''; update(); });
  box.addEventListener('dragover', (e) => { e.preventDefault(); box.classList.add('over'); });
  box.addEventListener('dragleave', () => box.classList.remove('over'));
  box.addEventListener('drop', (e) => {
    e.preventDefault();
    box.classList.remove('over');
    if (e.dataTransfer.files.length) {
      input.files = e.dataTransfer.files;
      update();
    }
  });
}

// The melody picker appears only where the loaded model takes a melody (asked again while it loads).
async function showFeatures() {
  try {
    const health = await (await fetch('/health')).json();
    $('melody-box').hidden = !(health.features && health.features.melody);
    const box = $('stream_audio-box');
    if (box && health.model_loaded && health.features && !health.features.stream_audio) {
      box.hidden = true; // this model cannot stream its audio
      $('stream_audio').checked = false;
    }
    if (health.status === 'loading') setTimeout(showFeatures, 2000);
  } catch (e) { /* the form works without the melody picker */ }
}

function show(text, kind, offerRetry = false) {
  const box = $('message');
  box.textContent = text;
  box.className = kind;
  box.hidden = false;
  $('retry').hidden = !offerRetry;
}

function setProgress(percent) {
  $('progress').value = percent;
  $('progress-text').textContent = `${percent.toFixed(1)}%`;
}

function setRunning(running) {
  $('generate').disabled = running;
  $('cancel').hidden = !running;
  $('description').readOnly = running;
}

// Parse one SSE message as the original client does; comment messages (`: keep-alive`) give null.
function parseMessage(message) {
  if (!message.startsWith('data: ')) return null;
  return JSON.parse(message.substring(6));
}

// Reads the stream until its terminal event, which it returns; throws when the stream ends without one.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = ''; // the server frames messages with `\n\n`
  while (true) {
    const { done, value } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const messages = buffer.split('\n\n');
    buffer = messages.pop() || '';
    for (const message of messages) {
      const event = parseMessage(message);
      if (!event) continue;
      onEvent(event);
      if (event.event === 'completed' || event.event === 'error') return event;
    }
  }
  throw new Error('the connection closed before the generation finished');
}

async function showHttpError(response) {
  let message = `HTTP ${response.status}`;
  try {
    message = (await response.json()).message || message;
  } catch (e) { /* not our JSON: keep the status */ }
  const retryAfter = response.headers.get('Retry-After');
  if (response.status === 503 && retryAfter !== null) {
    setState('busy');
    show(`The server is busy with another generation. Try again in ${retryAfter} s.`, 'busy', true);
  } else if (response.status === 401) {
    setState('unauthorized');
    const given = $('token').value.trim() !== '';
    $('token-box').hidden = false;
    $('token').focus();
    show(given ? 'The server did not accept this access token. Check it and try again.'
      : 'This server needs an access token: enter it above and try again.', 'error', true);
  } else if (response.status === 400 || response.status === 413) {
    setState('error');
    show(`The server rejected the request: ${message}`, 'error');
  } else {
    setState('error');
    show(`The server could not generate (${response.status}): ${message}`, 'error', true);
  }
}

function base64ToBlob(base64, type) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type });
}

function showAudio(event) {
  const format = event.format || 'wav'; // a request without 1.1 fields gets version 1.0's WAV
  if (audioUrl) URL.revokeObjectURL(audioUrl);
  audioUrl = URL.createObjectURL(base64ToBlob(event.audio, MIME_TYPES[format]));
  $('audio').src = audioUrl;
  $('download').href = audioUrl;
  $('download').type = MIME_TYPES[format];
  $('download').download = `musicgen-${event.seed ?? 'clip'}.${format}`;
  $('download').textContent = `Download ${format.toUpperCase()}`;
  const channels = event.channels === 2 ? 'stereo' : 'mono';
  $('result-info').textContent = `${event.duration} s · ${channels} · seed ${event.seed}`;
  $('result').hidden = false;
}

// Plays the `audio` events as they arrive: each chunk (16-bit PCM) becomes an AudioBuffer scheduled to start
// exactly where the previous one ends, so they play back to back. A chunk that arrives after the music so far
// has run out (a server slower than real time) starts LEAD_SECONDS later: that pause is the wait for music.
class LivePlayer {
  constructor() {
    this.context = new AudioContext(); // made in the click that starts the generation: browsers let it play
    this.rate = 32000;
    this.channels = 1;
    this.next = 0; // context time at which the next chunk starts
    this.scheduled = []; // { seq, at, duration } per chunk
    this.completedAt = null; // context time when `completed` arrived
  }

  begin(start) {
    this.rate = start.sample_rate || this.rate;
    this.channels = start.channels || this.channels;
  }

  add(event) {
    const bytes = Uint8Array.from(atob(event.pcm), (c) => c.charCodeAt(0));
    const pcm = new DataView(bytes.buffer);
    const frames = bytes.length / (2 * this.channels);
    const buffer = this.context.createBuffer(this.channels, frames, this.rate);
    for (let c = 0; c < this.channels; c += 1) {
      const data = buffer.getChannelData(c);
      for (let i = 0; i < frames; i += 1) data[i] = pcm.getInt16(2 * (i * this.channels + c), true) / 32768;
    }
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.context.destination);
    const now = this.context.currentTime;
    if (this.next < now + LEAD_SECONDS / 2) this.next = now + LEAD_SECONDS;
    source.start(this.next);
    this.scheduled.push({ seq: event.seq, at: this.next, duration: buffer.duration });
    this.next += buffer.duration;
  }

  get time() {
    return this.context.currentTime;
  }

  stop() {
    if (this.context.state !== 'closed') this.context.close();
  }
}

function onEvent(event) {
  if (event.event === 'start') {
    setProgress(0);
    const inputs = [];
    if (event.audio_prompt) inputs.push(`continuing ${event.audio_prompt.seconds} s of audio`);
    if (event.melody) inputs.push(`following a ${event.melody.seconds} s melody`);
    const seed = event.seed !== undefined ? ` (seed ${event.seed})` : '';
    show(`Generating${seed}${inputs.length ? `, ${inputs.join(', ')}` : ''}…`, 'info');
    if (live) live.begin(event);
  } else if (event.event === 'progress') {
    setProgress(event.progress);
  } else if (event.event === 'audio' && live) {
    live.add(event);
    if (event.seq === 0) {
      document.body.dataset.playing = 'live';
      show('Playing the music while it is being generated…', 'info');
    }
  } else if (event.event === 'completed' && live) {
    live.completedAt = live.time;
  }
}

async function generate() {
  if (controller) return;
  controller = new AbortController();
  if (live) live.stop();
  const streaming = $('stream_audio') && $('stream_audio').checked && !$('stream_audio-box').hidden;
  live = window.livePlayer = streaming ? new LivePlayer() : null; // before any await: still in the click
  delete document.body.dataset.playing;
  const started = performance.now();
  setState('running');
  setRunning(true);
  setProgress(0);
  $('progress-box').hidden = false;
  $('result').hidden = true;
  show('Preparing the request…', 'info');
  try {
    const headers = { 'Content-Type': 'application/json', Accept: 'text/event-stream' };
    const token = $('token').value.trim();
    if (token) headers.Authorization = `Bearer ${token}`;
    sessionStorage.setItem(TOKEN_KEY, token);
    const request = JSON.stringify(await body());
    show('Sending the request…', 'info');
    const response = await fetch(API, {
      method: 'POST',
      headers,
      body: request,
      signal: controller.signal,
    });
    if (!response.ok) {
      $('progress-box').hidden = true;
      await showHttpError(response);
      return;
    }
    const last = await readEvents(response, onEvent);
    if (last.event === 'completed') {
      setProgress(100);
      showAudio(last);
      const playing = live && live.scheduled.length ? ' The live playback goes on; the final file is below.' : '';
      show(`Done in ${((performance.now() - started) / 1000).toFixed(1)} s.${playing}`, 'ok');
      setState('done');
    } else {
      if (live) live.stop();
      show(`The generation failed: ${last.message || 'unknown error'}`, 'error', true);
      setState('error');
    }
  } catch (e) {
    if (live) live.stop();
    if (e.name === 'AbortError') {
      show('Cancelled: the server stopped working on it.', 'info');
      setState('cancelled');
    } else if (e instanceof InputFileError) {
      show(`${e.message}: pick it again.`, 'error');
      setState('error');
    } else {
      show(`Could not reach the server: ${e.message}. Check the connection and try again.`, 'error', true);
      setState('error');
    }
  } finally {
    controller = null;
    setRunning(false);
  }
}

function init() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) {
    $('token').value = token;
    $('token-box').hidden = false;
  }
  $('form').addEventListener('submit', (e) => { e.preventDefault(); generate(); });
  document.querySelectorAll('.drop').forEach(setUpDrop);
  showFeatures();
  $('retry').addEventListener('click', generate);
  $('cancel').addEventListener('click', () => controller && controller.abort());
  $('audio').addEventListener('play', () => live && live.stop()); // the final file takes over from the stream
  $('description').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); generate(); }
  });
  loadForm().then(() => {
    $('generate').disabled = false;
    setState('idle');
  }).catch((e) => {
    show(`Could not load the form from the server (${e.message}); reload the page to try again.`, 'error');
    setState('error');
  });
}

document.addEventListener('DOMContentLoaded', init);
