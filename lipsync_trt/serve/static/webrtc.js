// The WebRTC page of `serve --webrtc` (docs/LIVE.md): the microphone or a chosen audio file goes to the server as
// one audio track; the avatar's video and voice come back as two tracks of one media stream, played by one
// <video>. Signalling is one POST /offer (non-trickle ICE). A data channel carries "interrupt" (barge-in) to the
// server and the server's frame counts back, once a second. State for tests: window.webrtcState.
(() => {
  'use strict';
  const $ = (id) => document.getElementById(id);
  const S = window.webrtcState = {
    avatars: [], connection: 'new', source: null, errors: [], server: null,
    framesDecoded: 0, framesDropped: 0, videoWidth: 0, videoHeight: 0, currentTime: 0,
    latency: null,                 // {total, lookahead, behind, network, jitterBuffer} in ms
  };
  let pc = null, dc = null, sender = null, fileNode = null, audioCtx = null, micStream = null, timer = null;

  const log = (msg) => {
    S.errors.push(msg);
    const el = $('errors');
    el.textContent = (`${new Date().toISOString().slice(11, 23)} ${msg}\n` + el.textContent).slice(0, 20000);
  };
  const setConn = (text, on) => { $('conn').textContent = text; $('conn').className = 'pill ' + (on ? 'on' : 'off'); };
  const ms = (v) => (v === null || v === undefined || Number.isNaN(v)) ? '–' : `${Math.round(v)} ms`;

  async function loadAvatars() {
    const r = await fetch('avatars.json');
    const j = await r.json();
    S.avatars = j.avatars;
    $('avatar').innerHTML = '';
    for (const name of j.avatars) {
      const o = document.createElement('option');
      o.value = o.textContent = name;
      $('avatar').appendChild(o);
    }
  }

  function waitIce(peer, limitMs) {   // non-trickle: the offer goes with all candidates (or what came in limitMs)
    return new Promise((resolve) => {
      if (peer.iceGatheringState === 'complete') return resolve();
      const done = () => { if (peer.iceGatheringState === 'complete') { peer.removeEventListener('icegatheringstatechange', done); resolve(); } };
      peer.addEventListener('icegatheringstatechange', done);
      setTimeout(resolve, limitMs);
    });
  }

  async function connect(track) {
    const peer = pc = new RTCPeerConnection();
    const stream = new MediaStream();
    $('video').srcObject = stream;
    peer.addEventListener('track', (e) => { stream.addTrack(e.track); $('video').play().catch(() => {}); });
    peer.addEventListener('connectionstatechange', () => {
      S.connection = peer.connectionState;
      setConn(peer.connectionState, peer.connectionState === 'connected');
      if (peer === pc && ['failed', 'closed'].includes(peer.connectionState)) stop(`connection ${peer.connectionState}`);
    });
    sender = peer.addTrack(track, new MediaStream([track]));       // sendrecv: the avatar's voice comes back on it
    peer.addTransceiver('video', { direction: 'recvonly' });
    dc = peer.createDataChannel('control');
    dc.onmessage = (e) => { try { S.server = JSON.parse(e.data); } catch (_) { /* not ours */ } };
    await peer.setLocalDescription(await peer.createOffer());
    await waitIce(peer, 3000);
    const r = await fetch('offer', {
      method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ sdp: peer.localDescription.sdp, type: peer.localDescription.type, model: $('avatar').value }),
    });
    const answer = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
    if (!r.ok) throw new Error(`offer refused (HTTP ${r.status}): ${answer.error}`);
    await peer.setRemoteDescription(answer);
    $('stop').disabled = false;
    $('interrupt').disabled = false;
    timer = setInterval(readout, 1000);
  }

  async function useTrack(track, kind) {
    S.source = kind;
    try {
      if (pc && sender) {            // already connected: switch the source, drop what the old one left unsaid
        await sender.replaceTrack(track);
        if (dc && dc.readyState === 'open') dc.send('interrupt');
      } else {
        setConn('connecting…', false);
        await connect(track);
      }
    } catch (e) {
      log(String(e.message || e));
      stop();
    }
  }

  async function startMic() {
    try {
      micStream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (e) { log(`microphone: ${e.message || e}`); return; }
    await useTrack(micStream.getAudioTracks()[0], 'mic');
  }

  async function startFile(file) {
    audioCtx = audioCtx || new AudioContext({ sampleRate: 48000 });
    let buf;
    try { buf = await audioCtx.decodeAudioData(await file.arrayBuffer()); } catch (e) { log(`cannot decode ${file.name}: ${e.message || e}`); return; }
    if (fileNode) { try { fileNode.stop(); } catch (_) { /* ended */ } }
    const dest = audioCtx.createMediaStreamDestination();   // silence after the file ends: idle frames
    fileNode = audioCtx.createBufferSource();
    fileNode.buffer = buf;
    fileNode.connect(dest);
    await audioCtx.resume();
    fileNode.start();
    S.fileDuration = buf.duration;
    await useTrack(dest.stream.getAudioTracks()[0], 'file');
  }

  async function readout() {
    if (!pc) return;
    const v = $('video');
    S.videoWidth = v.videoWidth; S.videoHeight = v.videoHeight; S.currentTime = v.currentTime;
    let rtt = null, jb = null;
    const stats = await pc.getStats();
    stats.forEach((r) => {
      if (r.type === 'inbound-rtp' && r.kind === 'video') {
        S.framesDecoded = r.framesDecoded || 0;
        S.framesDropped = r.framesDropped || 0;
        if (r.jitterBufferEmittedCount) jb = 1000 * r.jitterBufferDelay / r.jitterBufferEmittedCount;
      }
      if (r.type === 'candidate-pair' && r.nominated && r.currentRoundTripTime !== undefined) rtt = 1000 * r.currentRoundTripTime;
    });
    const s = S.server;
    if (s) {
      const look = s.lookahead_ms + s.preroll_ms;
      const behind = Math.max(0, s.behind_ms);
      S.latency = { lookahead: look, behind, network: rtt === null ? null : rtt / 2, jitterBuffer: jb,
                    total: look + behind + (rtt || 0) / 2 + (jb || 0) };
      $('s-look').textContent = `${ms(s.lookahead_ms)} + ${ms(s.preroll_ms)}`;
      $('s-behind').textContent = ms(behind);
      $('s-frames').textContent = `${s.frames} (${s.speech} / ${s.idle})`;
      $('s-late').textContent = `${s.late} (${s.speech ? (100 * s.late / s.speech).toFixed(1) : '0.0'}% of speech)`;
      $('s-total').textContent = ms(S.latency.total);
    }
    $('s-rtt').textContent = ms(rtt === null ? null : rtt / 2);
    $('s-jb').textContent = ms(jb);
    $('s-decoded').textContent = `${S.framesDecoded} / ${S.framesDropped}`;
    $('s-size').textContent = v.videoWidth ? `${v.videoWidth}x${v.videoHeight}` : '–';
  }

  function stop(reason) {
    if (reason) log(reason);
    if (timer) clearInterval(timer);
    timer = null;
    if (fileNode) { try { fileNode.stop(); } catch (_) { /* ended */ } fileNode = null; }
    if (micStream) { micStream.getTracks().forEach((t) => t.stop()); micStream = null; }
    const peer = pc;
    pc = null; dc = null; sender = null;
    if (peer) peer.close();
    S.source = null;
    $('stop').disabled = true;
    $('interrupt').disabled = true;
    setConn('not connected', false);
  }

  $('mic').addEventListener('click', startMic);
  $('file').addEventListener('change', (e) => { if (e.target.files[0]) startFile(e.target.files[0]); e.target.value = ''; });
  $('stop').addEventListener('click', () => stop());
  $('interrupt').addEventListener('click', () => { if (dc && dc.readyState === 'open') dc.send('interrupt'); });
  loadAvatars().catch((e) => log(`avatars.json: ${e.message || e}`));
  window.webrtcApp = { startMic, startFile, stop, readout };
})();
