// The viewer page: pick a session, receive it over WHEP.
import { negotiate, hangup, StatsOverlay, setStatus as status } from '/web/webrtc.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(window.location.search);
let pc = null;
let resource = null;
let overlay = null;

window.lipstream = { get stats() { return overlay?.latest ?? { framesDecoded: 0 }; }, stop };

async function refresh() {
  const headers = $('token').value ? { Authorization: `Bearer ${$('token').value}` } : {};
  const wanted = params.get('session');
  try {
    const res = await fetch('/sessions', { headers });
    if (!res.ok) throw new Error(`${res.status}: ${(await res.text()).trim()}`);
    const { sessions } = await res.json();
    const ids = sessions.map((s) => s.id);
    if (wanted && !ids.includes(wanted)) ids.unshift(wanted);
    $('session').replaceChildren(...ids.map((id) => {
      const o = document.createElement('option');
      o.value = id;
      o.textContent = id;
      o.selected = id === wanted;
      return o;
    }));
    if (ids.length === 0) status('No session is being published.');
  } catch (e) {
    status(`Cannot list sessions: ${e.message}`, true);
  }
}

async function watch() {
  const id = $('session').value;
  if (!id) return status('Choose a session.', true);
  $('watch').disabled = true;
  try {
    pc = new RTCPeerConnection();
    pc.addTransceiver('audio', { direction: 'recvonly' });
    pc.addTransceiver('video', { direction: 'recvonly' });
    const remote = new MediaStream();
    $('remote').srcObject = remote;
    pc.ontrack = (e) => remote.addTrack(e.track);
    pc.onconnectionstatechange = () => status(`Connection: ${pc.connectionState}`, pc.connectionState === 'failed');
    resource = await negotiate(pc, `/whep?session=${encodeURIComponent(id)}`, $('token').value);
    overlay = new StatsOverlay(pc, $('stats'));
    $('stop').disabled = false;
  } catch (e) {
    status(`Could not watch: ${e.message}`, true);
    await stop();
  }
}

async function stop() {
  overlay?.stop();
  await hangup(resource, $('token').value);
  resource = null;
  pc?.close();
  pc = null;
  $('watch').disabled = false;
  $('stop').disabled = true;
}

$('refresh').addEventListener('click', refresh);
$('watch').addEventListener('click', watch);
$('stop').addEventListener('click', stop);
await refresh();
if (params.get('autostart') === '1') watch();
