// The publisher page: capture, publish over WHIP (sendrecv), show what comes back.
import { negotiate, hangup, StatsOverlay, setStatus as status } from '/web/webrtc.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(window.location.search);
let pc = null;
let resource = null;
let overlay = null;
let stream = null;

// Read by the browser test: the returned stream's live figures.
window.lipstream = { get stats() { return overlay?.latest ?? { framesDecoded: 0 }; }, stop, resource: () => resource };

async function listDevices() {
  try {
    const devices = await navigator.mediaDevices.enumerateDevices();
    for (const [kind, select] of [['videoinput', $('camera')], ['audioinput', $('mic')]]) {
      select.replaceChildren(...devices.filter((d) => d.kind === kind).map((d, i) => {
        const o = document.createElement('option');
        o.value = d.deviceId;
        o.textContent = d.label || `${kind === 'videoinput' ? 'Camera' : 'Microphone'} ${i + 1}`;
        return o;
      }));
    }
  } catch (e) {
    status(`Cannot list devices: ${e.message}`, true);
  }
}

async function capture() {
  if ($('source').value === 'file') {
    const file = $('file').files[0];
    if (!file) throw new Error('choose a file first');
    const el = document.createElement('video');
    el.src = URL.createObjectURL(file);
    el.loop = true;
    await el.play();
    const s = el.captureStream ? el.captureStream() : el.mozCaptureStream();
    if (s.getAudioTracks().length === 0) throw new Error('the file has no audio track; lipstream needs the speaker\'s audio');
    return s;
  }
  const camera = $('camera').value;
  const mic = $('mic').value;
  return navigator.mediaDevices.getUserMedia({
    video: camera ? { deviceId: { exact: camera }, width: 640, height: 480 } : { width: 640, height: 480 },
    audio: mic ? { deviceId: { exact: mic } } : true,
  });
}

async function start() {
  $('start').disabled = true;
  try {
    status('Capturing…');
    stream = await capture();
    $('local').srcObject = stream;
    pc = new RTCPeerConnection();
    const remote = new MediaStream();
    $('remote').srcObject = remote;
    pc.ontrack = (e) => remote.addTrack(e.track);
    pc.onconnectionstatechange = () => {
      status(`Connection: ${pc.connectionState}`, pc.connectionState === 'failed');
      if (pc.connectionState === 'failed') stop();
    };
    for (const track of stream.getTracks()) pc.addTransceiver(track, { direction: 'sendrecv', streams: [stream] });
    status('Negotiating…');
    resource = await negotiate(pc, '/whip', $('token').value);
    const id = resource.split('/').pop();
    const link = new URL(`/viewer?session=${id}`, window.location.href).toString();
    $('viewer-link').href = link;
    $('viewer-link').textContent = link;
    $('share').hidden = false;
    overlay = new StatsOverlay(pc, $('stats'));
    $('stop').disabled = false;
  } catch (e) {
    status(`Could not start: ${e.message}`, true);
    await stop();
  }
}

async function stop() {
  overlay?.stop();
  await hangup(resource, $('token').value);
  resource = null;
  pc?.close();
  pc = null;
  stream?.getTracks().forEach((t) => t.stop());
  stream = null;
  $('share').hidden = true;
  $('start').disabled = false;
  $('stop').disabled = true;
  if (!$('status').classList.contains('error')) status('Stopped.');
}

$('source').addEventListener('change', () => {
  const file = $('source').value === 'file';
  $('file-label').hidden = !file;
  $('camera-label').hidden = file;
  $('mic-label').hidden = file;
});
$('start').addEventListener('click', start);
$('stop').addEventListener('click', stop);
window.addEventListener('pagehide', () => { if (resource) hangup(resource, $('token').value); });

await listDevices();
if (params.get('autostart') === '1') start();
