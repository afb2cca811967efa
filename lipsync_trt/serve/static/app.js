// lipsync_trt browser client: microphone (or a WAV file) -> 40 ms chunks of 24 kHz float32 over the binary
// WebSocket protocol (docs/PROTOCOL.md) -> mouth crops back, overlaid on the avatar's template frames at 25 fps,
// played out a fixed delay behind the capture so that video and (optionally) audio stay in sync.
// Plain JavaScript, no build step, nothing fetched from outside this server.
'use strict';

(function () {
  const RATE = 24000;                 // Hz, the protocol's audio
  const CHUNK = 960;                  // samples per chunk = one video frame
  const CHUNK_S = CHUNK / RATE;       // 0.04 s
  const MAX_AUTO_DELAY = 6.0;         // s, the auto playout delay never grows beyond this
  const PENDING_MAX = 50;             // chunks held while the socket cannot take them (then the oldest drop)
  const WS_HIGH_WATER = 64 * 1024;    // bytes buffered in the socket before we hold chunks back
  const TIMELINE_CELLS = 100, TIMELINE_MAX = 400;
  const STATUS = ['ok', 'malformed', 'unknown model', 'wrong sample count', 'overloaded', 'internal error', 'end'];
  const ST_OK = 0, ST_OVERLOADED = 4, ST_INTERNAL = 5, ST_END = 6;
  // chunk / frame states on the timeline
  const EMPTY = 0, AUDIO = 1, SENT = 2, READY = 3, PLAYED = 4, LATE = 5, DROPPED = 6;
  const COLORS = ['#333', '#c9a227', '#3b6fd1', '#34c46a', '#1c6b3a', '#e07b2a', '#d03a3a'];

  const $ = (id) => document.getElementById(id);
  const now = () => performance.now() / 1000;

  // ---- page state, exposed for tests and debugging ----
  const S = window.lipsyncState = {
    connected: false, reconnects: 0, mode: 'idle', avatar: null, avatarSize: null,
    framesReceived: 0, lastFrameId: -1, receivedIds: [], outOfOrder: 0, reused: 0,
    chunksSent: 0, chunksDropped: 0, streams: 0, streamsEnded: 0, ended: false,
    framesDrawn: 0, overlaysDrawn: 0, lastOverlay: null, late: 0, dropped: 0,
    fps: 0, displayFps: 0, latency: null, latencyP90: null, latencyTotal: null, delay: 0.7,
    errors: [], statusCounts: {}, fileDuration: null,
    history: [],                      // ended streams: {seq, kind, chunks, total, received, contiguous}
  };

  const log = (msg) => {
    const line = `${new Date().toISOString().slice(11, 23)} ${msg}`;
    S.errors.push(msg);
    if (S.errors.length > 200) S.errors.shift();
    const el = $('errors');
    el.textContent = (line + '\n' + el.textContent).slice(0, 20000);
  };
  const info = (msg) => { const el = $('errors'); el.textContent = `${new Date().toISOString().slice(11, 23)} ${msg}\n` + el.textContent; };

  // ---- a minimal ZIP reader (the server writes stored entries; deflate is inflated with DecompressionStream) ----
  async function inflateRaw(bytes) {
    const ds = new DecompressionStream('deflate-raw');
    const out = new Response(new Blob([bytes]).stream().pipeThrough(ds));
    return new Uint8Array(await out.arrayBuffer());
  }

  async function readZip(u8) {
    const dv = new DataView(u8.buffer, u8.byteOffset, u8.byteLength);
    let end = -1;
    for (let i = u8.length - 22; i >= Math.max(0, u8.length - 22 - 65535); i--) {
      if (dv.getUint32(i, true) === 0x06054b50) { end = i; break; }
    }
    if (end < 0) throw new Error('zip: no end-of-central-directory record');
    const count = dv.getUint16(end + 10, true);
    let p = dv.getUint32(end + 16, true);
    const files = {};
    const td = new TextDecoder();
    for (let k = 0; k < count; k++) {
      if (p + 46 > u8.length || dv.getUint32(p, true) !== 0x02014b50) throw new Error('zip: bad central directory');
      const method = dv.getUint16(p + 10, true);
      const csize = dv.getUint32(p + 20, true);
      const nlen = dv.getUint16(p + 28, true), xlen = dv.getUint16(p + 30, true), clen = dv.getUint16(p + 32, true);
      const local = dv.getUint32(p + 42, true);
      const name = td.decode(u8.subarray(p + 46, p + 46 + nlen));
      p += 46 + nlen + xlen + clen;
      if (local + 30 > u8.length || dv.getUint32(local, true) !== 0x04034b50) throw new Error('zip: bad local header');
      const start = local + 30 + dv.getUint16(local + 26, true) + dv.getUint16(local + 28, true);
      if (start + csize > u8.length) throw new Error('zip: entry runs past the end');
      const data = u8.subarray(start, start + csize);
      if (method === 0) files[name] = data;
      else if (method === 8) files[name] = await inflateRaw(data);
      else throw new Error(`zip: compression method ${method} not supported`);
    }
    return files;
  }

  // ---- avatar: metadata and template frames (loaded around the playhead, kept in a small cache) ----
  let meta = null;            // {name, width, height, count, fps, boxes, order, ready_chunk_offsets, ready_chunk_period}
  let images = new Map();     // template n -> {img, ok}
  const CACHE = 150;

  function template(n) {
    let e = images.get(n);
    if (!e) {
      e = { img: new Image(), ok: false };
      e.img.onload = () => { e.ok = true; };
      e.img.onerror = () => { images.delete(n); };
      e.img.src = `avatar/${encodeURIComponent(meta.name)}/frame/${n}.jpg`;
      images.set(n, e);
    }
    return e.ok ? e.img : null;
  }

  function prefetch(frame) {
    if (!meta) return;
    const L = meta.order.length;
    const want = new Set();
    for (let k = 0; k < Math.min(60, L); k++) want.add(meta.order[(frame + k) % L]);
    for (const n of want) template(n);
    if (images.size > CACHE) {
      for (const n of images.keys()) {
        if (images.size <= CACHE) break;
        if (!want.has(n)) images.delete(n);
      }
    }
  }

  async function loadAvatar(name) {
    const r = await fetch(`avatar/${encodeURIComponent(name)}/meta.json`);
    if (!r.ok) throw new Error(`avatar ${name}: HTTP ${r.status}`);
    meta = await r.json();
    images = new Map();
    S.avatar = meta.name;
    S.avatarSize = [meta.width, meta.height];
    const c = $('video');
    c.width = meta.width;
    c.height = meta.height;
    prefetch(0);
    info(`avatar ${meta.name}: ${meta.width}x${meta.height}, ${meta.count} template frames`);
  }

  // ---- streams: one per microphone session / file / reconnection; frame ids restart at 0 ----
  let cur = null;             // the stream taking audio and being displayed
  let inflight = [];          // streams whose responses are still expected, oldest first (the server answers in order)
  let streamSeq = 0;

  function newStream(kind) {
    const s = {
      seq: ++streamSeq, kind, model: meta.name, nextId: 0, t0: null,
      sentAt: [], due: [], state: [], frames: new Map(), pending: [],
      endSentAt: null, total: null, lastOk: -1, received: 0, contiguous: true, dead: false, finished: false,
      ctxOffset: null, playhead: -1, playNext: 0, delay: S.delay,
    };
    S.streams++;
    S.ended = false;
    return s;
  }

  function growTo(s, i) {
    while (s.state.length <= i) s.state.push(EMPTY);
  }

  // ---- the socket: reconnect with back-off ----
  const wsUrl = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + location.pathname;
  let ws = null, backoff = 0.5, reconnectTimer = null;

  function connect() {
    reconnectTimer = null;
    let sock;
    try {
      sock = new WebSocket(wsUrl);
    } catch (e) {
      log(`WebSocket: ${e.message}`);
      scheduleReconnect();
      return;
    }
    sock.binaryType = 'arraybuffer';
    ws = sock;
    sock.onopen = () => {
      S.connected = true;
      backoff = 0.5;
      $('conn').textContent = 'connected';
      $('conn').className = 'pill on';
      flush();
    };
    sock.onmessage = (ev) => { if (typeof ev.data !== 'string') onResponse(ev.data); };
    sock.onclose = (ev) => {
      if (ws !== sock) return;
      S.connected = false;
      $('conn').textContent = `disconnected (${ev.code}${ev.reason ? ': ' + ev.reason : ''})`;
      $('conn').className = 'pill off';
      // the server dropped every stream of this connection: their remaining frames will never come
      for (const s of inflight) s.dead = true;
      if (cur) cur.dead = true;
      inflight = [];
      scheduleReconnect();
    };
    sock.onerror = () => {};
  }

  function scheduleReconnect() {
    if (reconnectTimer) return;
    const wait = backoff * (0.8 + 0.4 * Math.random());
    backoff = Math.min(10, backoff * 2);
    S.reconnects++;
    $('s-rec').textContent = S.reconnects;
    info(`reconnecting in ${wait.toFixed(1)} s`);
    reconnectTimer = setTimeout(connect, wait * 1000);
  }

  // ---- sending ----
  const encoder = new TextEncoder();

  function message(model, id, samples) {
    const name = encoder.encode(model);
    const abytes = samples ? samples.length * 4 : 0;
    const buf = new ArrayBuffer(16 + name.length + abytes);
    const dv = new DataView(buf);
    dv.setUint32(0, name.length, true);
    dv.setUint32(4, id, true);
    dv.setUint32(8, abytes, true);
    dv.setUint32(12, 0, true);
    new Uint8Array(buf, 16, name.length).set(name);
    for (let k = 0; k < (samples ? samples.length : 0); k++) dv.setFloat32(16 + name.length + 4 * k, samples[k], true);
    return buf;
  }

  // a captured chunk (960 samples at 24 kHz) enters the current stream
  function pushChunk(samples) {
    if (!meta) return;
    if (!cur || cur.dead || cur.endSentAt !== null) {
      cur = newStream(S.mode);
      inflight.push(cur);
    }
    const s = cur, i = s.nextId++;
    const t = now();
    if (s.t0 === null) s.t0 = t;
    growTo(s, i);
    s.state[i] = AUDIO;
    // playout time of frame i (and of this chunk's audio): a fixed delay behind capture, never earlier than
    // one frame after the previous one
    const base = s.t0 + i * CHUNK_S + S.delay;
    s.due[i] = i > 0 ? Math.max(s.due[i - 1] + CHUNK_S, base) : base;
    s.pending.push({ i, samples });
    if (s.pending.length > PENDING_MAX) {
      const old = s.pending.shift();
      s.state[old.i] = DROPPED;
      S.chunksDropped++;
    }
    if (playAudio()) scheduleAudio(s, i, samples);
    flush();
  }

  function flush() {
    const s = cur;
    if (!s || s.dead || !ws || ws.readyState !== WebSocket.OPEN) return;
    while (s.pending.length && ws.bufferedAmount < WS_HIGH_WATER) {
      const { i, samples } = s.pending.shift();
      ws.send(message(s.model, i, samples));
      s.sentAt[i] = now();
      if (s.state[i] === AUDIO) s.state[i] = SENT;
      S.chunksSent++;
    }
  }

  function endStream() {
    const s = cur;
    if (!s || s.dead || s.endSentAt !== null) return;
    flush();
    if (ws && ws.readyState === WebSocket.OPEN && s.nextId > 0) {
      ws.send(message(s.model, s.nextId, null));
      s.endSentAt = now();
    } else {
      s.endSentAt = now();
      s.dead = true;
    }
  }

  // ---- receiving ----
  // frame i is made once chunk readyChunk(i) has arrived: meta.json gives one period of the offsets
  function readyChunk(i) {
    const off = meta && meta.ready_chunk_offsets, period = meta && meta.ready_chunk_period;
    if (off && period) return i + off[i % period];
    return i + (off && i < off.length ? off[i] : 12);
  }

  const latencies = [], totals = [];
  const recvTimes = [];

  function onResponse(buf) {
    if (buf.byteLength < 16) { log(`response of ${buf.byteLength} bytes`); return; }
    const dv = new DataView(buf);
    const status = dv.getUint32(0, true), id = dv.getUint32(4, true), zlen = dv.getUint32(8, true);
    if (16 + zlen !== buf.byteLength) { log(`bad response header (zip length ${zlen}, ${buf.byteLength} bytes)`); return; }
    S.statusCounts[status] = (S.statusCounts[status] || 0) + 1;
    const t = now();
    const s = inflight[0];
    const zip = new Uint8Array(buf, 16, zlen);
    if (status === ST_OK) {
      if (!s) { log(`frame ${id} for no open stream`); return; }
      if (id <= s.lastOk) S.outOfOrder++;
      if (id !== s.lastOk + 1) s.contiguous = false;
      s.lastOk = id;
      s.received++;
      S.framesReceived++;
      S.lastFrameId = id;
      S.receivedIds.push(id);
      if (S.receivedIds.length > 2000) S.receivedIds.shift();
      recvTimes.push(t);
      const rc = readyChunk(id);
      const readyAt = s.sentAt[rc] !== undefined ? s.sentAt[rc] : (s.endSentAt !== null && rc >= s.nextId ? s.endSentAt : null);
      if (readyAt !== null) { latencies.push(t - readyAt); if (latencies.length > 200) latencies.shift(); }
      if (s.sentAt[id] !== undefined) { totals.push(t - s.sentAt[id]); if (totals.length > 200) totals.shift(); }
      const late = s.due[id] !== undefined && t > s.due[id];
      if (late && $('autodelay').checked && s.t0 !== null) {
        // raise the playout delay for the chunks still to come (a brief audio gap, never a loss of sync)
        const needed = t - (s.t0 + id * CHUNK_S) + 0.12;
        if (needed > S.delay) setDelay(Math.min(MAX_AUTO_DELAY, needed));
      }
      growTo(s, id);
      if (s.state[id] !== PLAYED && s.state[id] !== LATE) s.state[id] = READY;
      decodeFrame(s, id, zip);
    } else if (status === ST_END) {
      if (!s) return;
      s.total = id;
      s.finished = true;
      S.history.push({ seq: s.seq, kind: s.kind, chunks: s.nextId, total: id, received: s.received,
                       contiguous: s.contiguous });
      if (S.history.length > 50) S.history.shift();
      S.streamsEnded++;
      S.ended = true;
      inflight.shift();
      info(`stream ${s.seq} ended: ${id} frames`);
    } else {
      readZip(zip).then((files) => {
        const reason = files['error.txt'] ? new TextDecoder().decode(files['error.txt']) : '';
        log(`${STATUS[status] || 'status ' + status} (frame ${id})${reason ? ': ' + reason : ''}`);
      }).catch((e) => log(`${STATUS[status] || 'status ' + status} (frame ${id}); unreadable payload: ${e.message}`));
      if ((status === ST_OVERLOADED || status === ST_INTERNAL) && s && id < s.state.length) {
        s.state[id] = DROPPED;
        S.dropped++;
      }
    }
  }

  async function decodeFrame(s, id, zip) {
    try {
      const files = await readZip(zip);
      const jpg = files['frame.jpg'], bb = files['bbox.bin'];
      if (!jpg || !bb || bb.length !== 16) throw new Error('frame without frame.jpg and a 16-byte bbox.bin');
      const bdv = new DataView(bb.buffer, bb.byteOffset, 16);
      const box = [0, 4, 8, 12].map((o) => bdv.getFloat32(o, true));
      if (files['reused.txt']) S.reused++;
      const bitmap = await createImageBitmap(new Blob([jpg], { type: 'image/jpeg' }));
      if (s !== cur || id <= s.playhead) {        // too late to be shown, or not on screen: show the crop now
        drawCrop(id, bitmap, box);
        bitmap.close();
        return;
      }
      s.frames.set(id, { bitmap, box });
      // keep memory bounded: frames well behind the playhead are not needed any more
      for (const k of s.frames.keys()) {
        if (k < s.playhead) { s.frames.get(k).bitmap.close(); s.frames.delete(k); } else break;
      }
    } catch (e) {
      log(`frame ${id}: ${e.message}`);
      s.state[id] = DROPPED;
    }
  }

  // ---- audio out (files always, the microphone when "hear" is ticked): each chunk at its frame's time ----
  let actx = null;

  async function audioContext() {
    if (!actx) {
      try {
        actx = new AudioContext({ sampleRate: RATE, latencyHint: 'interactive' });
      } catch (e) {
        actx = new AudioContext();        // this browser cannot open 24 kHz: the worklet resamples
        info(`AudioContext at ${actx.sampleRate} Hz (resampling to 24 kHz)`);
      }
    }
    if (actx.state !== 'running') await actx.resume();
    return actx;
  }

  function playAudio() {
    return actx && (S.mode === 'file' || (S.mode === 'mic' && $('monitor').checked));
  }

  function scheduleAudio(s, i, samples) {
    if (s.ctxOffset === null) s.ctxOffset = actx.currentTime - now();
    const at = s.due[i] + s.ctxOffset;
    if (at < actx.currentTime) return;
    const b = actx.createBuffer(1, samples.length, RATE);
    b.copyToChannel(samples, 0);
    const src = actx.createBufferSource();
    src.buffer = b;
    src.connect(actx.destination);
    src.start(at);
  }

  // ---- microphone ----
  let mic = null;             // {stream, node, source}
  let worklet = false;        // the capture module is loaded in actx

  async function startMic() {
    if (!meta) throw new Error('no avatar loaded');
    await stopInput();
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new Error('no microphone API here (the page needs http://localhost or https)');
    }
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: false, autoGainControl: false },
    });
    let ctx = await audioContext(), source;
    try {
      source = ctx.createMediaStreamSource(stream);
    } catch (e) {
      // some browsers cannot feed a microphone into a context at another rate: capture at the device rate and
      // let the worklet resample to 24 kHz
      await ctx.close();
      actx = new AudioContext();
      worklet = false;
      ctx = await audioContext();
      source = ctx.createMediaStreamSource(stream);
      info(`AudioContext at ${ctx.sampleRate} Hz (resampling to 24 kHz)`);
    }
    if (!worklet) {
      await ctx.audioWorklet.addModule('static/capture-worklet.js');
      worklet = true;
    }
    const node = new AudioWorkletNode(ctx, 'lipsync-capture', {
      numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
      processorOptions: { inputRate: ctx.sampleRate },
    });
    node.port.onmessage = (e) => { if (S.mode === 'mic') pushChunk(e.data); };
    source.connect(node);
    node.connect(ctx.destination);       // silent output: keeps the node pulled by the graph
    mic = { stream, node, source };
    setMode('mic');
    cur = null;
    info(`microphone at ${ctx.sampleRate} Hz`);
  }

  // ---- a file: decoded at 24 kHz, sent at the pace of real time ----
  let filePump = null;

  async function startFile(arrayBuffer) {
    if (!meta) throw new Error('no avatar loaded');
    await stopInput();
    await audioContext();
    const off = new OfflineAudioContext(1, RATE, RATE);
    const decoded = await off.decodeAudioData(arrayBuffer);   // resampled to 24 kHz
    const n = decoded.length;
    const mono = new Float32Array(n);
    for (let c = 0; c < decoded.numberOfChannels; c++) {
      const ch = decoded.getChannelData(c);
      for (let k = 0; k < n; k++) mono[k] += ch[k] / decoded.numberOfChannels;
    }
    S.fileDuration = n / RATE;
    const chunks = Math.ceil(n / CHUNK);
    setMode('file');
    cur = null;
    info(`file: ${(n / RATE).toFixed(2)} s, ${chunks} chunks`);
    const t0 = now();
    let k = 0;
    const pump = { timer: null };
    pump.timer = setInterval(() => {
      const due = Math.floor((now() - t0) / CHUNK_S) + 1;     // a chunk is sent once its 40 ms have "passed"
      while (k < Math.min(due, chunks)) {
        const c = new Float32Array(CHUNK);
        c.set(mono.subarray(k * CHUNK, Math.min(n, (k + 1) * CHUNK)));
        pushChunk(c);
        k++;
      }
      if (k >= chunks) {
        clearInterval(pump.timer);
        filePump = null;
        endStream();
        setMode('idle');
      }
    }, 10);
    filePump = pump;
  }

  async function stopInput() {
    if (mic) {
      mic.node.port.postMessage('stop');
      mic.source.disconnect();
      mic.node.disconnect();
      for (const tr of mic.stream.getTracks()) tr.stop();
      mic = null;
    }
    if (filePump) { clearInterval(filePump.timer); filePump = null; }
    endStream();
    setMode('idle');
  }

  function setMode(m) {
    S.mode = m;
    $('s-mode').textContent = m;
    $('stop').disabled = m === 'idle';
  }

  function setDelay(d) {
    S.delay = d;
    $('delay').value = Math.round(d * 1000);
  }

  // ---- drawing at 25 fps ----
  const vctx = $('video').getContext('2d');
  const cctx = $('crop').getContext('2d');
  let idleStart = now(), lastIdle = -1;
  const drawTimes = [];
  let shown = null;           // {stream, id}

  function drawTemplate(n) {
    const img = template(n);
    if (!img) return false;
    vctx.drawImage(img, 0, 0, meta.width, meta.height);
    return true;
  }

  function drawCrop(id, bitmap, box) {
    const c = $('crop');
    cctx.fillStyle = '#000';
    cctx.fillRect(0, 0, c.width, c.height);
    const sc = Math.min(c.width / bitmap.width, c.height / bitmap.height);
    const w = bitmap.width * sc, h = bitmap.height * sc;
    cctx.drawImage(bitmap, (c.width - w) / 2, (c.height - h) / 2, w, h);
    $('cropinfo').textContent = `frame ${id}: ${bitmap.width}x${bitmap.height} at (${box.map((v) => Math.round(v)).join(', ')})`;
  }

  function showFrame(s, i) {
    const L = meta.order.length;
    prefetch(i + 1);
    if (!drawTemplate(meta.order[i % L])) return;     // template not loaded yet: hold the previous picture
    S.framesDrawn++;
    drawTimes.push(now());
    const f = s.frames.get(i);
    growTo(s, i);
    if (f) {
      const [x1, y1, x2, y2] = f.box;
      vctx.drawImage(f.bitmap, x1, y1, x2 - x1, y2 - y1);
      drawCrop(i, f.bitmap, f.box);
      S.lastOverlay = { id: i, box: f.box, template: meta.order[i % L], size: [f.bitmap.width, f.bitmap.height] };
      S.overlaysDrawn++;
      s.state[i] = PLAYED;
    } else if (s.state[i] !== DROPPED) {
      s.state[i] = LATE;
      S.late++;
    }
  }

  function tick() {
    if (!meta) return;
    const t = now();
    const s = cur;
    if (s && !s.dead && s.t0 !== null) {
      // the playhead: the last frame whose playout time has come (frames past the last chunk follow on)
      let i = s.playhead;
      const last = s.total !== null ? s.total - 1 : Infinity;
      for (;;) {
        const j = i + 1;
        if (j > last) break;
        let due = s.due[j];
        if (due === undefined) {
          if (s.endSentAt === null || s.nextId === 0) break;
          due = s.due[s.nextId - 1] + (j - s.nextId + 1) * CHUNK_S;
        }
        if (due > t) break;
        i = j;
      }
      if (i !== s.playhead && i >= 0) {
        s.playhead = i;
        showFrame(s, i);
      }
      const over = s.finished ? i >= last : (s.endSentAt !== null && t > s.endSentAt + S.delay + 30);
      if (!over && s.playhead >= 0) return;
      if (!over) { idleFrame(t); return; }     // until the stream's first frame is due, the avatar idles on
      for (const f of s.frames.values()) f.bitmap.close();
      s.frames.clear();
      cur = null;
      idleStart = t;
      lastIdle = -1;
    }
    idleFrame(t);
  }

  // idle: the avatar's own frames in order, no mouth
  function idleFrame(t) {
    const k = Math.floor((t - idleStart) / CHUNK_S);
    if (k !== lastIdle) {
      lastIdle = k;
      prefetch(k + 1);
      if (drawTemplate(meta.order[k % meta.order.length])) { S.framesDrawn++; drawTimes.push(t); }
    }
  }

  function drawTimeline() {
    const c = $('timeline'), g = c.getContext('2d');
    g.fillStyle = '#222';
    g.fillRect(0, 0, c.width, c.height);
    const s = cur || (inflight.length ? inflight[inflight.length - 1] : null);
    // from a little before the playhead to a little past the newest chunk (wider when the delay is long)
    const head = s ? Math.max(s.nextId, s.playhead + 1) : 0;
    const cells = Math.min(TIMELINE_MAX, Math.max(TIMELINE_CELLS, head - (s ? s.playhead : 0) + 20));
    const w = c.width / cells;
    const start = Math.max(0, head - cells + 10);
    for (let k = 0; k < cells; k++) {
      const i = start + k;
      const st = s && i < s.state.length ? s.state[i] : EMPTY;
      g.fillStyle = COLORS[st];
      g.fillRect(k * w + 0.5, 4, Math.max(1, w - 1), c.height - 8);
    }
    if (s && s.playhead >= start) {
      const x = (s.playhead - start + 1) * w;
      g.fillStyle = '#fff';
      g.fillRect(x - 1, 0, 2, c.height);
    }
  }

  function pct(a, q) {
    if (!a.length) return null;
    const b = a.slice().sort((x, y) => x - y);
    return b[Math.min(b.length - 1, Math.floor(q * b.length))];
  }

  function updateStats() {
    const t = now();
    while (recvTimes.length && recvTimes[0] < t - 1) recvTimes.shift();
    while (drawTimes.length && drawTimes[0] < t - 1) drawTimes.shift();
    S.fps = recvTimes.length;
    S.displayFps = drawTimes.length;
    const p50 = pct(latencies, 0.5), p90 = pct(latencies, 0.9), tot = pct(totals, 0.5);
    S.latency = p50 === null ? null : Math.round(p50 * 1000);
    S.latencyP90 = p90 === null ? null : Math.round(p90 * 1000);
    S.latencyTotal = tot === null ? null : Math.round(tot * 1000);
    $('s-frames').textContent = S.framesReceived;
    $('s-last').textContent = S.lastFrameId < 0 ? '–' : S.lastFrameId;
    $('s-fps').textContent = S.fps;
    $('s-dfps').textContent = S.displayFps;
    $('s-lat').textContent = S.latency === null ? '–' : `${S.latency} / ${S.latencyP90} ms`;
    $('s-total').textContent = S.latencyTotal === null ? '–' : `${S.latencyTotal} ms`;
    $('s-delay').textContent = `${Math.round(S.delay * 1000)} ms${$('autodelay').checked ? ' (auto)' : ''}`;
    $('s-late').textContent = `${S.late} / ${S.dropped + S.chunksDropped}`;
    drawTimeline();
  }

  // ---- controls ----
  async function run(fn) {
    try { await fn(); } catch (e) { log(e.message || String(e)); setMode('idle'); }
  }

  $('mic').onclick = () => run(startMic);
  $('stop').onclick = () => run(stopInput);
  $('file').onchange = (ev) => {
    const f = ev.target.files && ev.target.files[0];
    if (f) run(async () => startFile(await f.arrayBuffer()));
    ev.target.value = '';
  };
  $('delay').onchange = () => {
    const v = Number($('delay').value);
    if (v >= 100) S.delay = v / 1000;
  };
  $('avatar').onchange = () => run(async () => {
    await stopInput();
    cur = null;
    await loadAvatar($('avatar').value);
  });

  async function init() {
    setDelay(Number($('delay').value) / 1000);
    connect();
    try {
      const r = await fetch('avatars.json');
      const list = (await r.json()).avatars || [];
      const sel = $('avatar');
      for (const name of list) {
        const o = document.createElement('option');
        o.value = o.textContent = name;
        sel.appendChild(o);
      }
      const want = new URLSearchParams(location.search).get('avatar');
      if (want && list.includes(want)) sel.value = want;
      if (list.length) await loadAvatar(sel.value);
      else log('this server has no avatars');
    } catch (e) {
      log(`loading avatars: ${e.message}`);
    }
    setInterval(tick, 5);
    setInterval(updateStats, 250);
  }

  window.lipsyncApp = { startMic, startFile, stop: stopInput, loadAvatar, readZip, readyChunk, socket: () => ws };
  init();
})();
