// Pages of ANOTHER origin than the API, in Debian's Chromium: what the browser lets them do and read.
// tests/test_cors.py serves the pages (a second local HTTP server) and judges what this prints (one JSON line).
//
// usage: node cross_origin.js client PAGE_URL OUT_FILE
//          open a page holding the original document's JavaScript client (it runs on load); save the file it
//          downloads to OUT_FILE
//        node cross_origin.js fetch PAGE_URL REQUESTS_JSON
//          open PAGE_URL, then fetch each request from inside it, in turn: [{url, method, headers, body} or
//          with bodyBytes: N instead of body for a JSON body of about N bytes]; what the page could read of each.
//          A request with hold: true is left streaming (its status read) until the last one is answered.
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');
const { chromium } = require('playwright-core');

const EXECUTABLE = process.env.CHROMIUM || '/usr/bin/chromium';

async function withPage(pageUrl, work) {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'musicgen-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: EXECUTABLE,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    const page = await context.newPage();
    const seen = { log: [], errors: [] }; // the page's console
    page.on('console', (m) => (m.type() === 'error' ? seen.errors : seen.log).push(m.text()));
    page.on('pageerror', (e) => seen.errors.push(String(e)));
    return await work(page, seen);
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

// The client runs as the page loads; it ends with a download, or with a message on the console.
async function client(pageUrl, outFile) {
  return withPage(pageUrl, async (page, seen) => {
    const download = page.waitForEvent('download', { timeout: 120000 }).catch(() => null);
    const ended = page.waitForEvent('console', {
      predicate: (m) => /音乐生成完成|错误|请求失败/.test(m.text()), timeout: 120000 });
    await page.goto(pageUrl);
    const origin = await page.evaluate(() => window.location.origin);
    const completed = /音乐生成完成/.test((await ended).text());
    const saved = completed ? await download : null; // the client clicks its link right after that message
    if (saved) await saved.saveAs(outFile);
    return { origin, downloadName: saved ? saved.suggestedFilename() : null, ...seen };
  });
}

// One request made by the page itself: the status, body and headers the browser lets it read, or the error.
async function fetchFromPage(page, request) {
  return page.evaluate(async ({ url, method, headers, body, bodyBytes, hold, mode }) => {
    if (bodyBytes) body = JSON.stringify({ description: 'x'.repeat(bodyBytes) });
    try {
      const controller = new AbortController();
      const response = await fetch(url, { method, headers, body, mode, signal: controller.signal });
      if (hold) {
        (window.held = window.held || []).push(controller);
        response.body.getReader().read(); // under way: the server is working on it
        return { status: response.status, held: true };
      }
      const text = await response.text();
      const events = text.split('\n\n').filter((m) => m.startsWith('data: ')).map((m) => JSON.parse(m.slice(6)));
      let json = null;
      try { json = JSON.parse(text); } catch (e) { /* a stream, not one JSON document */ }
      const last = events[events.length - 1];
      return {
        status: response.status,
        contentType: response.headers.get('Content-Type'),
        retryAfter: response.headers.get('Retry-After'),
        message: json && json.message,
        events: events.map((e) => e.event),
        audioBytes: last && last.audio ? atob(last.audio).length : null,
      };
    } catch (e) {
      return { error: `${e.name}: ${e.message}` };
    }
  }, request);
}

async function fetchAll(pageUrl, requests) {
  return withPage(pageUrl, async (page, seen) => {
    await page.goto(pageUrl);
    const origin = await page.evaluate(() => window.location.origin);
    const results = [];
    for (const request of requests) results.push(await fetchFromPage(page, request));
    await page.evaluate(() => (window.held || []).forEach((controller) => controller.abort()));
    return { origin, results, ...seen };
  });
}

async function main() {
  const [mode, pageUrl, arg] = process.argv.slice(2);
  let result;
  if (mode === 'client') result = await client(pageUrl, arg);
  else if (mode === 'fetch') result = await fetchAll(pageUrl, JSON.parse(arg));
  else throw new Error(`unknown mode ${mode}`);
  process.stdout.write(JSON.stringify(result) + '\n');
}

main().catch((e) => {
  process.stderr.write(`${e.stack || e}\n`);
  process.exit(1);
});
