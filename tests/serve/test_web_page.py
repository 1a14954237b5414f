"""The gateway's web page in headless Chromium over real tritonservers: pick the sft mode and a
registered speaker, type text, synthesize; the page streams the audio and leaves a playable WAV in
<audio id="result"> whose duration is the streamed samples / the announced sample rate."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from tests.pipelines.browser import Browser, chromium_binary
from tests.serve.conftest import SAMPLE_RATE

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(chromium_binary() is None, reason="chromium is not installed (Debian package "
                                 "`chromium`; `make sysdeps` as root)")]

SPEAKER = "001"  # in the registry file from the start (the serving model dir's spk2info.pt)
TEXT = "a short test."  # the LLM stand-in answers this speaker with 38 speech tokens (2 chunks): fast on CPU


@pytest.fixture()
def browser():
    browser = Browser(width=1000, height=900)
    try:
        yield browser
    finally:
        browser.close()


def _js(value) -> str:
    return json.dumps(value)


def test_page_synthesizes_playable_audio_of_the_streamed_duration(gateway, browser):
    with httpx.Client(base_url=gateway, timeout=300) as http:
        response = http.post("/inference_sft", data={"tts_text": TEXT, "spk_id": SPEAKER})
    assert response.status_code == 200, response.text
    expected = len(np.frombuffer(response.content, dtype="<i2")) / SAMPLE_RATE

    browser.open(gateway + "/")
    options = browser.wait_for(f"""(() => {{
        const ids = [...document.querySelectorAll('#speaker option')].map(o => o.value);
        return ids.includes({_js(SPEAKER)}) ? ids : null; }})()""", timeout=30)
    assert options, "the page did not list the registered speakers"
    browser.evaluate(f"""(() => {{
        const mode = document.getElementById('mode');
        mode.value = 'sft'; mode.dispatchEvent(new Event('change'));
        document.getElementById('speaker').value = {_js(SPEAKER)};
        document.getElementById('tts_text').value = {_js(TEXT)};
        document.getElementById('synthesize').click(); }})()""")
    state = browser.wait_for("""(() => { const s = document.getElementById('status').dataset.state;
        return s === 'done' || s === 'error' ? s : null; })()""", timeout=240)
    status = browser.evaluate("({...document.getElementById('status').dataset, "
                              "text: document.getElementById('status').textContent})")
    assert state == "done", status
    assert int(status["sampleRate"]) == SAMPLE_RATE
    assert abs(float(status["duration"]) - expected) < 1e-3

    # the <audio> element decodes the WAV the page built: playable, of the streamed duration
    audio = browser.wait_for("""(() => { const a = document.getElementById('result');
        return a.readyState >= 1 && isFinite(a.duration)
            ? {duration: a.duration, error: a.error && a.error.code, src: a.src.slice(0, 5)} : null; })()""",
                             timeout=30)
    assert audio, "the <audio> element never loaded the result"
    assert audio["error"] is None and audio["src"] == "blob:"
    assert audio["duration"] > 0
    assert abs(audio["duration"] - expected) < 1e-3
    assert browser.evaluate("!document.getElementById('download').classList.contains('hidden')")
