// WHIP/WHEP signalling and live stats, shared by the publisher and viewer pages.

/** Shows `text` in the page's status line, in red when it is an error. */
export function setStatus(text, error = false) {
  const el = document.getElementById('status');
  el.textContent = text;
  el.classList.toggle('error', error);
}

/** Waits until ICE gathering completes (host candidates: milliseconds), or gives up after `ms`. */
function gathered(pc, ms) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === 'complete') { pc.removeEventListener('icegatheringstatechange', done); resolve(); } };
    pc.addEventListener('icegatheringstatechange', done);
    setTimeout(resolve, ms);
  });
}

/** Sends the local offer to a WHIP/WHEP endpoint, applies the answer, returns the resource URL. */
export async function negotiate(pc, endpoint, token) {
  await pc.setLocalDescription(await pc.createOffer());
  await gathered(pc, 1500);
  const headers = { 'Content-Type': 'application/sdp' };
  if (token) headers.Authorization = `Bearer ${token}`;
  const res = await fetch(endpoint, { method: 'POST', headers, body: pc.localDescription.sdp });
  const body = await res.text();
  if (res.status !== 201) throw new Error(`${res.status} ${res.statusText}: ${body.trim()}`);
  const location = res.headers.get('Location');
  if (!location) throw new Error('the server answered without a Location header');
  await pc.setRemoteDescription({ type: 'answer', sdp: body });
  return new URL(location, new URL(endpoint, window.location.href)).toString();
}

/** Ends a WHIP/WHEP resource; errors are only logged (the server also reaps silent peers). */
export async function hangup(resource, token) {
  if (!resource) return;
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  // keepalive lets the DELETE finish while the page unloads.
  try { await fetch(resource, { method: 'DELETE', headers, keepalive: true }); } catch (e) { console.warn('DELETE failed', e); }
}

/** Polls getStats() once a second and renders the figures people look at into `element`. */
export class StatsOverlay {
  constructor(pc, element) {
    this.pc = pc;
    this.element = element;
    this.latest = { framesDecoded: 0 };
    this.timer = setInterval(() => this.poll().catch((e) => console.warn('getStats', e)), 1000);
  }

  stop() { clearInterval(this.timer); }

  async poll() {
    const s = { framesDecoded: 0, framesDropped: 0, fpsIn: 0, fpsOut: 0, rttMs: null, jitterVideoMs: null, jitterAudioMs: null, kbpsIn: 0, codec: '' };
    const report = await this.pc.getStats();
    const codecs = new Map();
    report.forEach((r) => { if (r.type === 'codec') codecs.set(r.id, r.mimeType); });
    report.forEach((r) => {
      if (r.type === 'inbound-rtp' && r.kind === 'video') {
        s.framesDecoded = r.framesDecoded ?? 0;
        s.framesDropped = r.framesDropped ?? 0;
        s.fpsIn = r.framesPerSecond ?? 0;
        s.jitterVideoMs = r.jitter != null ? r.jitter * 1000 : null;
        s.codec = codecs.get(r.codecId) ?? '';
        if (this.prevBytes != null) s.kbpsIn = ((r.bytesReceived - this.prevBytes) * 8) / 1000;
        this.prevBytes = r.bytesReceived;
      } else if (r.type === 'inbound-rtp' && r.kind === 'audio') {
        s.jitterAudioMs = r.jitter != null ? r.jitter * 1000 : null;
      } else if (r.type === 'outbound-rtp' && r.kind === 'video') {
        s.fpsOut = r.framesPerSecond ?? 0;
      } else if (r.type === 'candidate-pair' && r.nominated && r.currentRoundTripTime != null) {
        s.rttMs = r.currentRoundTripTime * 1000;
      }
    });
    this.latest = s;
    const f = (v, unit = '') => (v == null ? '–' : `${Math.round(v * 10) / 10}${unit}`);
    this.element.textContent =
      `${s.codec} in ${f(s.fpsIn)} fps · out ${f(s.fpsOut)} fps · rtt ${f(s.rttMs, ' ms')}\n` +
      `jitter v ${f(s.jitterVideoMs, ' ms')} a ${f(s.jitterAudioMs, ' ms')} · ${f(s.kbpsIn, ' kbit/s')}\n` +
      `decoded ${s.framesDecoded} · dropped ${s.framesDropped}`;
  }
}
