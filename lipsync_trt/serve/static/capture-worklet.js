// AudioWorklet: microphone samples in, 40 ms chunks of 24 kHz mono float32 out (960 samples each).
// When the AudioContext could not be opened at 24 kHz, the input is resampled here (linear interpolation,
// streaming: no gaps between render quanta). Each chunk is posted to the page as a transferred Float32Array.
const TARGET_RATE = 24000;
const CHUNK = 960;

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.inRate = opts.inputRate || sampleRate;
    this.step = this.inRate / TARGET_RATE;   // input samples per output sample
    this.pos = 0;                            // next output position, in input samples relative to `prev`
    this.prev = 0;                           // last input sample of the previous quantum (index -1)
    this.buf = new Float32Array(CHUNK);
    this.fill = 0;
    this.active = true;
    this.port.onmessage = (e) => { if (e.data === 'stop') this.active = false; };
  }

  push(v) {
    this.buf[this.fill++] = v;
    if (this.fill === CHUNK) {
      const out = this.buf;
      this.port.postMessage(out, [out.buffer]);
      this.buf = new Float32Array(CHUNK);
      this.fill = 0;
    }
  }

  process(inputs) {
    const input = inputs[0];
    if (!this.active) return false;
    if (!input || input.length === 0 || input[0].length === 0) return true;
    const n = input[0].length;
    // Down-mix to mono.
    let mono = input[0];
    if (input.length > 1) {
      mono = new Float32Array(n);
      for (let c = 0; c < input.length; c++) {
        const ch = input[c];
        for (let k = 0; k < n; k++) mono[k] += ch[k] / input.length;
      }
    }
    if (this.step === 1) {
      for (let k = 0; k < n; k++) this.push(mono[k]);
      return true;
    }
    // Linear resampling: output sample at input position p (p in [-1, n-1]; -1 is `prev`).
    let p = this.pos;
    while (p <= n - 1) {
      const i = Math.floor(p);
      const f = p - i;
      const a = i < 0 ? this.prev : mono[i];
      const b = mono[Math.min(i + 1, n - 1)];
      this.push(a + (b - a) * f);
      p += this.step;
    }
    this.pos = p - n;
    this.prev = mono[n - 1];
    return true;
  }
}

registerProcessor('lipsync-capture', CaptureProcessor);
