// The gateway's page: one upstream endpoint call per synthesis, played as the PCM chunks arrive
// (Web Audio), then kept as a WAV for the <audio> element and the download link.
// #status carries the outcome for people and for tests: data-state (idle|running|done|error),
// data-sample-rate, data-first-chunk-ms, data-duration (seconds of audio), data-chunks, data-error.
"use strict";

const $ = (id) => document.getElementById(id);
const status = $("status");
const FIELDS = {  // which inputs each mode shows
  sft: ["speaker-row"],
  zero_shot: ["speaker-row", "prompt-row", "prompt-text-row"],
  cross_lingual: ["speaker-row", "prompt-row"],
  instruct2: ["speaker-row", "prompt-row", "instruct-row"],
  instruct: ["speaker-row", "instruct-row"],
};
let lastUrl = null;

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

function setStatus(state, text, data = {}) {
  status.dataset.state = state;
  for (const [key, value] of Object.entries(data)) status.dataset[key] = String(value);
  status.textContent = text;
}

function showFields() {
  const shown = FIELDS[$("mode").value];
  for (const row of ["speaker-row", "prompt-row", "prompt-text-row", "instruct-row"]) {
    $(row).classList.toggle("hidden", !shown.includes(row));
  }
}

async function loadSpeakers() {
  const select = $("speaker");
  try {
    const response = await fetch("/speakers", { headers: authHeaders() });
    if (!response.ok) throw new Error((await response.json()).detail || response.statusText);
    const { speakers } = await response.json();
    select.replaceChildren(...speakers.map((id) => new Option(id, id)));
    $("speaker-hint").textContent = speakers.length ? "" : "(none registered: POST /speakers)";
  } catch (error) {
    $("speaker-hint").textContent = "(could not list speakers: " + error.message + ")";
  }
}

function formFor(mode) {
  const form = new FormData();
  form.append("tts_text", $("tts_text").value);
  const file = $("prompt_wav").files[0];
  const usesAudio = FIELDS[mode].includes("prompt-row") && file;
  if (usesAudio) form.append("prompt_wav", file, file.name);
  else if ($("speaker").value) form.append("spk_id", $("speaker").value);
  if (mode === "zero_shot") form.append("prompt_text", $("prompt_text").value);
  if (mode === "instruct" || mode === "instruct2") form.append("instruct_text", $("instruct_text").value);
  return form;
}

function wavBlob(pieces, sampleRate) {
  const bytes = pieces.reduce((n, p) => n + p.byteLength, 0);
  const header = new DataView(new ArrayBuffer(44));
  const text = (offset, s) => [...s].forEach((c, i) => header.setUint8(offset + i, c.charCodeAt(0)));
  text(0, "RIFF"); header.setUint32(4, 36 + bytes, true); text(8, "WAVE");
  text(12, "fmt "); header.setUint32(16, 16, true); header.setUint16(20, 1, true); header.setUint16(22, 1, true);
  header.setUint32(24, sampleRate, true); header.setUint32(28, sampleRate * 2, true);
  header.setUint16(32, 2, true); header.setUint16(34, 16, true);
  text(36, "data"); header.setUint32(40, bytes, true);
  return new Blob([header.buffer, ...pieces], { type: "audio/wav" });
}

class Player {  // schedules each chunk right after the previous one
  constructor(sampleRate) {
    this.sampleRate = sampleRate;
    try {
      this.context = new (window.AudioContext || window.webkitAudioContext)();
    } catch (error) {
      this.context = null;  // no audio output here: the WAV is still built
    }
    this.next = 0;
  }
  play(samples) {
    if (!this.context || !samples.length) return;
    try {
      const buffer = this.context.createBuffer(1, samples.length, this.sampleRate);
      const channel = buffer.getChannelData(0);
      for (let i = 0; i < samples.length; i++) channel[i] = samples[i] / 32768;
      const source = this.context.createBufferSource();
      source.buffer = buffer;
      source.connect(this.context.destination);
      this.next = Math.max(this.next, this.context.currentTime + 0.05);
      source.start(this.next);
      this.next += buffer.duration;
    } catch (error) {
      this.context = null;
    }
  }
}

async function synthesize(event) {
  event.preventDefault();
  const mode = $("mode").value;
  const button = $("synthesize");
  button.disabled = true;
  $("download").classList.add("hidden");
  setStatus("running", "Synthesizing…", { duration: "", firstChunkMs: "", sampleRate: "", chunks: 0, error: "" });
  const started = performance.now();
  try {
    const response = await fetch("/inference_" + mode, { method: "POST", body: formFor(mode), headers: authHeaders() });
    if (!response.ok) {
      let detail = response.statusText;
      try { detail = (await response.json()).detail; } catch (ignored) { /* not JSON */ }
      throw new Error(response.status + ": " + (typeof detail === "string" ? detail : JSON.stringify(detail)));
    }
    const sampleRate = parseInt(response.headers.get("X-Sample-Rate"), 10);
    if (!(sampleRate > 0)) throw new Error("the response has no X-Sample-Rate header");
    const player = new Player(sampleRate);
    const reader = response.body.getReader();
    const pieces = [];
    let carry = null;  // an odd byte left over from the previous network chunk
    let samples = 0;
    let firstChunkMs = null;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      let bytes = value;
      if (carry !== null) {
        bytes = new Uint8Array(value.length + 1);
        bytes[0] = carry; bytes.set(value, 1);
        carry = null;
      }
      if (bytes.length % 2) { carry = bytes[bytes.length - 1]; bytes = bytes.subarray(0, bytes.length - 1); }
      if (!bytes.length) continue;
      const pcm = new Int16Array(bytes.slice().buffer);
      if (firstChunkMs === null) firstChunkMs = Math.round(performance.now() - started);
      pieces.push(pcm);
      samples += pcm.length;
      player.play(pcm);
      setStatus("running", `Streaming… ${(samples / sampleRate).toFixed(2)} s`,
                { firstChunkMs, sampleRate, chunks: pieces.length, duration: (samples / sampleRate).toFixed(3) });
    }
    if (!samples) throw new Error("the gateway returned no audio");
    const blob = wavBlob(pieces, sampleRate);
    if (lastUrl) URL.revokeObjectURL(lastUrl);
    lastUrl = URL.createObjectURL(blob);
    $("result").src = lastUrl;
    $("download").href = lastUrl;
    $("download").classList.remove("hidden");
    const duration = samples / sampleRate;
    setStatus("done", `${duration.toFixed(2)} s of audio at ${sampleRate} Hz; first chunk after ${firstChunkMs} ms`,
              { duration: duration.toFixed(3), firstChunkMs, sampleRate, chunks: pieces.length });
  } catch (error) {
    setStatus("error", "Failed: " + error.message, { error: error.message });
  } finally {
    button.disabled = false;
  }
}

$("mode").addEventListener("change", showFields);
$("form").addEventListener("submit", synthesize);
$("token").addEventListener("change", loadSpeakers);
showFields();
loadSpeakers();
