// Drives Debian's Chromium (headless, never a downloaded browser) through one scenario on the web page
// and prints what it saw as one JSON object on stdout; tests/test_web.py runs it and judges the result.
//
// usage: node scenario.js SCENARIO BASE_URL ARTIFACTS_DIR
//   generate  generate a 20 s clip: progress values seen, the <audio> duration, the WAV's header; screenshots
//   invalid   a whitespace-only description: the 400 message
//   cancel    start a 60 s MBD generation, cancel it, time until /health says ready again
//   busy      (another generation runs) the busy message; once the server is free, Retry generates a clip
//   token     (the server has MUSICGEN_AUTH_TOKEN=let-me-in) no token, a wrong one, the right one; after a reload
//   continue  upload ARTIFACTS_DIR/prompt.flac to continue, as MP3: play the result, download it
//   melody    (a melody model) the melody picker is shown; drop ARTIFACTS_DIR/tune.wav on it and generate
//   stream    generate a 20 s clip playing it while it is made: the Web Audio clock when `completed` came, and
//             where each chunk was scheduled
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');
const { chromium } = require('playwright-core');

const [scenario, baseUrl, artifacts] = process.argv.slice(2);
const EXECUTABLE = process.env.CHROMIUM || '/usr/bin/chromium';

async function launch() {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'musicgen-chromium-'));
  // A persistent context is how playwright takes a --user-data-dir: a fresh one per run.
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: EXECUTABLE,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--autoplay-policy=no-user-gesture-required'],
    acceptDownloads: true,
    viewport: { width: 900, height: 900 },
  });
  return { context, profile };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function health() {
  try {
    return (await (await fetch(`${baseUrl}/health`)).json()).status;
  } catch (e) {
    return `unreachable: ${e.message}`;
  }
}

// Record every distinct value the progress bar shows, sampled in the page itself.
async function watchProgress(page) {
  await page.evaluate(() => {
    window.seenProgress = [];
    const bar = document.getElementById('progress');
    setInterval(() => {
      const seen = window.seenProgress;
      if (seen[seen.length - 1] !== bar.value) seen.push(bar.value);
    }, 20);
  });
}

async function openPage(context) {
  const page = await context.newPage();
  const consoleErrors = [];
  page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text()); });
  page.on('pageerror', (e) => consoleErrors.push(String(e)));
  // What the page's Content-Security-Policy refused, as the page itself is told (the console says it too).
  await page.addInitScript(() => {
    window.cspViolations = [];
    document.addEventListener('securitypolicyviolation', (e) => window.cspViolations.push(
      `${e.violatedDirective} ${e.blockedURI}`));
  });
  const response = await page.goto(baseUrl + '/');
  await page.waitForSelector('body[data-state="idle"]', { timeout: 30000 });
  return { page, consoleErrors, policy: response.headers()['content-security-policy'] || null };
}

async function finished(page, timeout = 120000) {
  await page.waitForSelector('body:not([data-state="running"])', { timeout });
  return page.evaluate(() => ({
    state: document.body.dataset.state,
    message: document.getElementById('message').textContent,
    retryVisible: !document.getElementById('retry').hidden,
  }));
}

// What the finished page offers: the <audio> element's duration and the file its download link saves
// (clicked, as a user does: the page's policy would rightly refuse a script fetching the blob).
async function audioResult(page) {
  await page.waitForFunction(() => document.getElementById('audio').readyState >= 1, null, { timeout: 10000 });
  const [download] = await Promise.all([page.waitForEvent('download'), page.click('#download')]);
  const bytes = fs.readFileSync(await download.path());
  return {
    audioDuration: await page.evaluate(() => document.getElementById('audio').duration),
    riff: bytes.toString('latin1', 0, 4),
    wave: bytes.toString('latin1', 8, 12),
    bytes: bytes.length,
    downloadName: download.suggestedFilename(),
    resultInfo: await page.textContent('#result-info'),
  };
}

async function generateScenario(context) {
  const { page, consoleErrors, policy } = await openPage(context);
  const form = await page.evaluate(() => [...document.querySelectorAll('.fields input')].map((i) => ({
    name: i.name, type: i.type, min: i.min, max: i.max, value: i.type === 'checkbox' ? i.checked : i.value,
    advanced: !!i.closest('details'),
  })));
  await page.fill('#description', 'calm piano with soft strings');
  await page.fill('#duration', '20');  // long enough for several progress events from the fast debug model
  await page.click('summary');
  await page.fill('#seed', '1234');
  await watchProgress(page);
  await page.click('#generate');
  const outcome = await finished(page);
  const audio = outcome.state === 'done' ? await audioResult(page) : null;
  const progress = await page.evaluate(() => window.seenProgress);
  await page.screenshot({ path: path.join(artifacts, 'web-desktop.png'), fullPage: true });
  // The README's picture (docs/web-page.png is a copy): a finished clip, advanced settings folded.
  await page.click('summary');
  await page.setViewportSize({ width: 720, height: 600 });
  await page.screenshot({ path: path.join(artifacts, 'web-readme.png'), fullPage: true });
  await page.setViewportSize({ width: 375, height: 800 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  await page.screenshot({ path: path.join(artifacts, 'web-phone.png'), fullPage: true });
  const cspViolations = await page.evaluate(() => window.cspViolations);
  return { form, outcome, audio, progress, phoneOverflowPx: overflow, consoleErrors, policy, cspViolations };
}

async function invalidScenario(context) {
  const { page } = await openPage(context);
  await page.fill('#description', '   ');
  await page.click('#generate');
  return { outcome: await finished(page, 10000) };
}

async function cancelScenario(context) {
  const { page } = await openPage(context);
  await page.fill('#description', 'a long one');
  await page.fill('#duration', '60');
  await page.check('#mbd');
  await page.click('#generate');
  // Cancel once the server is visibly working on it.
  await page.waitForFunction(() => document.getElementById('progress').value > 1, null, { timeout: 60000 });
  const progressAtCancel = await page.evaluate(() => document.getElementById('progress').value);
  const busyBefore = await health();
  const clicked = Date.now();
  await page.click('#cancel');
  const outcome = await finished(page, 10000);
  let status = await health();
  while (status !== 'ready' && Date.now() - clicked < 10000) {
    await sleep(50);
    status = await health();
  }
  return { progressAtCancel, busyBefore, outcome, readyAfterMs: Date.now() - clicked, finalHealth: status };
}

async function busyScenario(context) {
  const { page } = await openPage(context);
  await page.fill('#description', 'second in line');
  await page.fill('#duration', '2');
  await page.click('#generate');
  const busy = await finished(page, 10000);
  await page.screenshot({ path: path.join(artifacts, 'web-busy.png'), fullPage: true });
  const waitStart = Date.now();
  while ((await health()) !== 'ready' && Date.now() - waitStart < 120000) await sleep(100);
  await page.click('#retry');
  const retried = await finished(page);
  return { busy, retried, audio: retried.state === 'done' ? await audioResult(page) : null };
}

async function tokenScenario(context) {
  const { page } = await openPage(context);
  const tokenShownAtFirst = await page.isVisible('#token');
  await page.fill('#description', 'behind a token');
  await page.fill('#duration', '2');
  await page.click('#generate');
  const missing = { ...(await finished(page, 10000)), tokenShown: await page.isVisible('#token'),
    tokenFocused: await page.evaluate(() => document.activeElement.id === 'token') };
  await page.fill('#token', 'wrong');
  await page.click('#retry');
  const wrong = await finished(page, 10000);
  await page.fill('#token', 'let-me-in');
  await page.click('#generate');
  const right = await finished(page);
  const audio = right.state === 'done' ? await audioResult(page) : null;
  await page.reload();  // the tab keeps its token: the next generation needs no typing
  await page.waitForSelector('body[data-state="idle"]', { timeout: 30000 });
  const kept = await page.inputValue('#token');
  await page.fill('#description', 'again');
  await page.fill('#duration', '1');
  await page.click('#generate');
  const afterReload = await finished(page);
  return { tokenShownAtFirst, missing, wrong, right, audio, kept, afterReload };
}

// Play the finished clip for a moment: the <audio> element decodes it and its clock moves.
async function play(page) {
  await page.waitForFunction(() => document.getElementById('audio').readyState >= 1, null, { timeout: 10000 });
  return page.evaluate(async () => {
    const audio = document.getElementById('audio');
    audio.muted = true;
    await audio.play();
    await new Promise((resolve) => setTimeout(resolve, 700));
    audio.pause();
    return { duration: audio.duration, playedTo: audio.currentTime, error: audio.error && audio.error.message };
  });
}

// Click the download link as a user does; the file lands in ARTIFACTS_DIR under the name the page gave it.
async function download(page) {
  const [file] = await Promise.all([page.waitForEvent('download'), page.click('#download')]);
  const saved = path.join(artifacts, `downloaded-${file.suggestedFilename()}`);
  await file.saveAs(saved);
  return {
    name: file.suggestedFilename(), saved, linkText: await page.textContent('#download'),
    linkType: await page.getAttribute('#download', 'type'),
  };
}

async function continueScenario(context) {
  const { page, consoleErrors } = await openPage(context);
  const melodyShown = await page.isVisible('#melody');
  await page.fill('#description', 'the same riff, with drums');
  await page.fill('#duration', '4');
  await page.setInputFiles('#audio_prompt', path.join(artifacts, 'prompt.flac'));
  const chosen = await page.textContent('#audio_prompt-box .chosen');
  await page.click('summary');
  await page.selectOption('#format', 'mp3');
  await page.fill('#seed', '77');
  const formats = await page.evaluate(() => [...document.getElementById('format').options].map((o) => o.value));
  const messages = [];
  await page.exposeFunction('sawMessage', (text) => messages.push(text));
  await page.evaluate(() => new MutationObserver(() => window.sawMessage(document.getElementById('message')
    .textContent)).observe(document.getElementById('message'), { childList: true, characterData: true, subtree: true }));
  await page.click('#generate');
  const outcome = await finished(page);
  const result = outcome.state === 'done' ? { played: await play(page), downloaded: await download(page) } : {};
  await page.screenshot({ path: path.join(artifacts, 'web-continue.png'), fullPage: true });
  return { melodyShown, chosen, formats, messages, outcome, ...result, consoleErrors };
}

async function melodyScenario(context) {
  const { page, consoleErrors } = await openPage(context);
  await page.waitForSelector('#melody-box:not([hidden])', { timeout: 10000 });
  // Drop a file on the picker, as from a file manager: a DataTransfer holding the file's bytes.
  const bytes = [...fs.readFileSync(path.join(artifacts, 'tune.wav'))];
  await page.evaluate((data) => {
    const transfer = new DataTransfer();
    transfer.items.add(new File([new Uint8Array(data)], 'tune.wav', { type: 'audio/wav' }));
    document.getElementById('melody-box').dispatchEvent(new DragEvent('drop', { dataTransfer: transfer,
      bubbles: true, cancelable: true }));
  }, bytes);
  const chosen = await page.textContent('#melody-box .chosen');
  await page.fill('#description', 'following a tune');
  await page.fill('#duration', '2');
  await page.click('#generate');
  const outcome = await finished(page);
  return { chosen, outcome, played: outcome.state === 'done' ? await play(page) : null, consoleErrors };
}

async function streamScenario(context) {
  const { page, consoleErrors, policy } = await openPage(context);
  const checkedByDefault = await page.isChecked('#stream_audio');
  await page.fill('#description', 'heard while it is made');
  await page.fill('#duration', '20');
  await page.click('#generate');
  await page.waitForSelector('body[data-playing="live"]', { timeout: 60000 });
  const whilePlaying = await page.evaluate(() => ({
    state: document.body.dataset.state, message: document.getElementById('message').textContent,
    chunks: window.livePlayer.scheduled.length, contextState: window.livePlayer.context.state,
  }));
  const outcome = await finished(page);
  const live = await page.evaluate(() => ({
    scheduled: window.livePlayer.scheduled, completedAt: window.livePlayer.completedAt,
    timeAfter: window.livePlayer.time,
  }));
  const audio = outcome.state === 'done' ? await audioResult(page) : null;
  const cspViolations = await page.evaluate(() => window.cspViolations);
  await page.screenshot({ path: path.join(artifacts, 'web-stream.png'), fullPage: true });
  return { checkedByDefault, whilePlaying, outcome, live, audio, consoleErrors, policy, cspViolations };
}

const SCENARIOS = {
  generate: generateScenario, invalid: invalidScenario, cancel: cancelScenario, busy: busyScenario,
  token: tokenScenario, continue: continueScenario, melody: melodyScenario, stream: streamScenario,
};

async function main() {
  if (!SCENARIOS[scenario]) throw new Error(`unknown scenario ${scenario}`);
  fs.mkdirSync(artifacts, { recursive: true });
  const { context, profile } = await launch();
  try {
    const result = await SCENARIOS[scenario](context);
    process.stdout.write(JSON.stringify(result) + '\n');
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

main().catch((e) => {
  process.stderr.write(`${e.stack || e}\n`);
  process.exit(1);
});
