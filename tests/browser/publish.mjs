// Opens the lipstream page in headless Debian chromium with fake camera + microphone, publishes
// over WHIP, and waits until the returned video has decoded enough frames; then opens the viewer
// page for the same session and waits for it to decode frames too. Prints one JSON line.
//
//   node publish.mjs http://127.0.0.1:8080 [min_frames]
import { chromium } from 'playwright-core';

const base = process.argv[2];
const minFrames = Number(process.argv[3] ?? 100);
const timeout = 60_000;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
    '--autoplay-policy=no-user-gesture-required',
  ],
});
const errors = [];
const result = {};
try {
  const context = await browser.newContext();
  const watch = (page, name) => {
    page.on('console', (m) => console.error(`[${name}] ${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => errors.push(`${name}: ${e.message}`));
  };
  const publisher = await context.newPage();
  watch(publisher, 'publisher');
  await publisher.goto(`${base}/?autostart=1`);
  await publisher.waitForFunction((n) => window.lipstream.stats.framesDecoded > n, minFrames, { timeout });
  result.publisher = await publisher.evaluate(() => window.lipstream.stats);
  const session = (await publisher.evaluate(() => window.lipstream.resource())).split('/').pop();

  const viewer = await context.newPage();
  watch(viewer, 'viewer');
  await viewer.goto(`${base}/viewer?session=${session}&autostart=1`);
  await viewer.waitForFunction(() => window.lipstream.stats.framesDecoded > 25, null, { timeout });
  result.viewer = await viewer.evaluate(() => window.lipstream.stats);

  await viewer.evaluate(() => window.lipstream.stop());
  await publisher.evaluate(() => window.lipstream.stop());
  result.statusAfterStop = await publisher.textContent('#status');
} finally {
  await browser.close();
}
result.errors = errors;
console.log(JSON.stringify(result));
process.exit(errors.length === 0 ? 0 : 1);
