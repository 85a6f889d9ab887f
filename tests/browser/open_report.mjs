// Opens a bench sessions HTML report (file path) in headless Debian chromium and reports what it
// shows: the number of inline SVG plots, the page title, and any console or page errors. It must
// not fetch anything from the network.
import { chromium } from 'playwright-core';
import { pathToFileURL } from 'node:url';

const file = process.argv[2];
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const errors = [];
const requests = [];
try {
  const page = await browser.newPage();
  page.on('console', (m) => { if (m.type() === 'error') errors.push(`console: ${m.text()}`); });
  page.on('pageerror', (e) => errors.push(`page: ${e.message}`));
  page.on('request', (r) => { if (!r.url().startsWith('file:')) requests.push(r.url()); });
  await page.goto(pathToFileURL(file).href);
  const result = await page.evaluate(() => ({
    title: document.title,
    svgs: document.querySelectorAll('svg').length,
    summary: document.getElementById('summary')?.textContent ?? '',
  }));
  console.log(JSON.stringify({ ...result, errors, requests }));
} finally {
  await browser.close();
}
process.exit(errors.length === 0 ? 0 : 1);
