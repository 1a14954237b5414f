"""Speaker registry + prompt cache: spk2info.pt round trips, cache hits, LRU, a real redis-server, errors.

Triton is replaced by a pool that runs the same reference ONNX models the ``audio_tokenizer`` /
``speaker_embedding`` Triton models run (``cosyvoice.triton.runtime``), with their tensor contracts
(LLM-offset int32 tokens, fp16 embedding), and counts the calls.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import numpy as np
import pytest
import torch

from cosyvoice.serve.metrics import REGISTRY
from cosyvoice.serve.registry import REDIS_PREFIX, Prompt, PromptCache, SpeakerRegistry, UnknownSpeaker
from cosyvoice.triton import runtime

REDIS_SERVER = "/usr/bin/redis-server"


class CountingPool:
    """``TritonPool.infer`` over the reference ONNX models, checking Triton's input contract."""

    def __init__(self, sessions):
        self.tokenizer, self.campplus = sessions
        self.calls: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0

    async def infer(self, model, inputs, outputs):
        self.calls[model] = self.calls.get(model, 0) + 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.02)  # let a concurrent call start
            wav = inputs["reference_wav"]
            assert wav.dtype == np.float32 and wav.ndim == 2 and wav.shape[0] == 1
            if model == "audio_tokenizer":
                assert outputs == ["prompt_speech_tokens"]
                length = inputs["reference_wav_len"]
                assert length.dtype == np.int32 and length.shape == (1, 1) and int(length[0, 0]) == wav.shape[1]
                tokens = runtime.speech_tokens(self.tokenizer, wav[0]) + runtime.ORIGINAL_VOCAB_SIZE
                return {"prompt_speech_tokens": tokens.astype(np.int32)[None]}
            assert model == "speaker_embedding" and outputs == ["prompt_spk_embedding"]
            return {"prompt_spk_embedding": runtime.speaker_embedding(self.campplus, wav[0]).astype(np.float16)[None]}
        finally:
            self.in_flight -= 1


def voice(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """Speech-like 16 kHz float32: a gliding harmonic tone with a syllable-rate envelope, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * runtime.SAMPLE_RATE)) / runtime.SAMPLE_RATE
    f0 = 120 + 40 * seed + 20 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / runtime.SAMPLE_RATE
    wav = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)) ** 2
    return (0.2 * wav + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def counter(result: str) -> float:
    return REGISTRY.get_sample_value("cosyvoice_gateway_prompt_cache_total", {"result": result}) or 0.0


@pytest.fixture(scope="module")
def sessions(tiny_models):
    return (runtime.onnx_session(os.path.join(tiny_models, "speech_tokenizer_v2.onnx")),
            runtime.onnx_session(os.path.join(tiny_models, "campplus.onnx")))


@pytest.fixture()
def pool(sessions):
    return CountingPool(sessions)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A real Debian redis-server on a free 127.0.0.1 port, no persistence; stopped after the module."""
    import redis

    from cosyvoice.triton.server import free_port

    if not os.path.exists(REDIS_SERVER):
        pytest.fail(f"{REDIS_SERVER} missing: install the Debian redis-server package (see the Dockerfile)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {port} (exit {proc.poll()})") from None
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def expected_prompt(sessions, wav) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the cosyvoice2 BLS's ``_prompt`` computes for reference audio (embedding through fp16)."""
    tokens, feat = runtime.align_prompt(runtime.speech_tokens(sessions[0], wav), runtime.prompt_speech_feat(wav))
    embedding = runtime.speaker_embedding(sessions[1], wav).astype(np.float16).astype(np.float32)
    return tokens, feat, embedding


def test_register_writes_spk2info_that_a_second_worker_reads(tmp_path, pool, sessions):
    path = str(tmp_path / "registry" / "spk2info.pt")
    wav = voice(2.0, seed=1)

    async def main():
        registry = SpeakerRegistry(path, pool=pool, cache=PromptCache(8))
        assert registry.speakers() == []
        other = SpeakerRegistry(path, pool=pool, cache=PromptCache(8))  # another gateway worker, started before
        prompt = await registry.register("alice", wav, "  Hello there.  ")
        return registry, other, prompt

    registry, other, prompt = asyncio.run(main())
    table = torch.load(path, map_location="cpu", weights_only=True)
    assert list(table) == ["alice"]  # no "001": a gateway registry holds what users registered
    entry = table["alice"]
    assert set(entry) == {"prompt_text", "speech_token", "speech_feat", "embedding"}
    tokens, feat, embedding = expected_prompt(sessions, wav)
    assert entry["prompt_text"] == "Hello there."
    assert entry["speech_token"].dtype == torch.int32 and tuple(entry["speech_token"].shape) == (1, len(tokens))
    assert entry["speech_feat"].dtype == torch.float32 and tuple(entry["speech_feat"].shape) == (1, 2 * len(tokens), 80)
    assert entry["embedding"].dtype == torch.float32 and tuple(entry["embedding"].shape) == (1, 192)
    np.testing.assert_array_equal(entry["speech_token"][0].numpy(), tokens)
    np.testing.assert_array_equal(entry["speech_feat"][0].numpy(), feat)
    np.testing.assert_array_equal(entry["embedding"][0].numpy(), embedding)
    np.testing.assert_array_equal(prompt.speech_token, tokens)
    assert pool.calls == {"audio_tokenizer": 1, "speaker_embedding": 1}

    fresh = SpeakerRegistry(path, pool=pool, cache=PromptCache(8))
    for reader in (fresh, other):  # a new process, and one that loaded the file before the write
        assert reader.speakers() == ["alice"]
        got = reader.get("alice")
        assert got.text == "Hello there."
        np.testing.assert_array_equal(got.speech_feat, feat)
        np.testing.assert_array_equal(got.embedding, embedding)
    assert not [f for f in os.listdir(tmp_path / "registry") if ".tmp-" in f]

    registry.delete("alice")
    assert other.speakers() == [] and list(torch.load(path, weights_only=True)) == []


def test_build_spk2info_file_loads_and_stays_bls_compatible(tmp_path, tiny_models, pool, sessions):
    import soundfile as sf

    from cosyvoice.triton.spk2info import build_spk2info

    data = tmp_path / "data"
    data.mkdir()
    wav = voice(2.5, seed=2)
    sf.write(data / "u1.wav", wav, runtime.SAMPLE_RATE, subtype="FLOAT")
    (data / "wav.scp").write_text(f"spkA_u1 {data / 'u1.wav'}\n")
    (data / "text").write_text("spkA_u1 the quick brown fox\n")
    (data / "utt2spk").write_text("spkA_u1 spkA\n")
    path = str(tmp_path / "spk2info.pt")
    build_spk2info(str(data), tiny_models, path, speakers=["spkA"])
    before = torch.load(path, weights_only=True)

    registry = SpeakerRegistry(path, pool=pool, cache=PromptCache(8))
    assert registry.speakers() == ["001", "spkA"]
    built = registry.get("spkA")
    assert built.text == "the quick brown fox"
    np.testing.assert_array_equal(built.speech_feat, before["spkA"]["speech_feat"][0].numpy())
    inputs = built.bls_inputs()
    assert {k: (v.dtype, v.shape) for k, v in inputs.items()} == {
        "prompt_speech_tokens": (np.int32, (1, len(built.speech_token))),
        "prompt_speech_feat": (np.float16, (1, 2 * len(built.speech_token), 80)),
        "prompt_spk_embedding": (np.float16, (1, 192)),
        "reference_text": (np.dtype(object), (1, 1))}
    assert inputs["reference_text"][0, 0] == "the quick brown fox"

    async def main():
        # the gateway computes the same features from the same audio as build_spk2info did offline
        computed = await registry.prompt_from_audio(wav, "same voice")
        await registry.register("bob", voice(1.5, seed=3), "bob speaking")
        return computed

    computed = asyncio.run(main())
    np.testing.assert_array_equal(computed.speech_token, built.speech_token)
    np.testing.assert_array_equal(computed.speech_feat, built.speech_feat)
    np.testing.assert_allclose(computed.embedding, built.embedding, rtol=1e-3, atol=1e-3)  # Triton returns fp16
    after = runtime.load_spk2info(path)  # what the BLS loads: "001" still there
    assert sorted(after) == ["001", "bob", "spkA"]
    for key in ("001", "spkA"):
        for field in ("speech_token", "speech_feat", "embedding"):
            assert torch.equal(after[key][field], before[key][field])


def test_same_audio_is_computed_once(pool):
    wav = voice(2.0, seed=4)
    hits, misses = counter("hit"), counter("miss")

    async def main():
        registry = SpeakerRegistry(None, pool=pool, cache=PromptCache(8))
        first = await registry.prompt_from_audio(wav, "first text")
        assert pool.max_in_flight == 2  # audio_tokenizer and speaker_embedding run concurrently
        second = await registry.prompt_from_audio(wav.copy(), "second text")
        burst = await asyncio.gather(*(registry.prompt_from_audio(voice(2.0, seed=5), f"t{i}") for i in range(3)))
        return registry, first, second, burst

    registry, first, second, burst = asyncio.run(main())
    assert pool.calls == {"audio_tokenizer": 2, "speaker_embedding": 2}  # seed 4 once, the burst of seed 5 once
    assert (first.text, second.text) == ("first text", "second text")
    np.testing.assert_array_equal(first.speech_feat, second.speech_feat)
    assert [p.text for p in burst] == ["t0", "t1", "t2"]
    assert (registry.cache.hits, registry.cache.misses) == (1, 4)
    assert registry.cache.hit_rate() == pytest.approx(0.2)
    assert (counter("hit") - hits, counter("miss") - misses) == (1, 4)
    with pytest.raises(ValueError, match="read-only"):
        first.speech_feat[0, 0] = 1.0  # cached arrays are shared between requests


def _prompt(n: int, text: str = "") -> Prompt:
    rng = np.random.default_rng(n)
    return Prompt(text=text, speech_token=rng.integers(0, 6561, 5 + n), speech_feat=rng.standard_normal((10 + 2 * n, 80)),
                  embedding=rng.standard_normal(192))


def test_lru_evicts_the_least_recently_used():
    cache = PromptCache(2)

    async def main():
        await cache.put("a", _prompt(1))
        await cache.put("b", _prompt(2))
        assert await cache.get("a") is not None  # a is now the most recent
        await cache.put("c", _prompt(3))
        return [await cache.get(k) is not None for k in "abc"]

    assert asyncio.run(main()) == [True, False, True]
    assert len(cache) == 2 and (cache.hits, cache.misses) == (3, 1)
    assert PromptCache.key(voice(1.0)) == PromptCache.key(voice(1.0).astype(np.float64))
    assert PromptCache.key(voice(1.0)) != PromptCache.key(voice(1.0, seed=1))


def test_redis_shares_prompts_between_workers(redis_url, pool):
    import redis

    wav = voice(2.0, seed=6)
    key = PromptCache.key(wav)

    async def main():
        worker_a = SpeakerRegistry(None, pool=pool, cache=PromptCache(4, redis_url=redis_url, ttl_s=600))
        worker_b = SpeakerRegistry(None, pool=pool, cache=PromptCache(4, redis_url=redis_url, ttl_s=600))
        try:
            computed = await worker_a.prompt_from_audio(wav, "from a")
            shared = await worker_b.prompt_from_audio(wav, "from b")
            original = _prompt(7, text="voilà 你好")
            await worker_a.cache.put("roundtrip", original)
            copied = await worker_b.cache.get("roundtrip")
            return worker_b.cache, computed, shared, original, copied
        finally:
            await worker_a.cache.close()
            await worker_b.cache.close()

    cache_b, computed, shared, original, copied = asyncio.run(main())
    assert pool.calls == {"audio_tokenizer": 1, "speaker_embedding": 1}
    assert (cache_b.hits, cache_b.misses) == (2, 0) and shared.text == "from b"
    for a, b in ((computed, shared), (original, copied)):
        for field in ("speech_token", "speech_feat", "embedding"):
            x, y = getattr(a, field), getattr(b, field)
            assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
    assert copied.text == "voilà 你好"

    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.get(REDIS_PREFIX + key)
        assert raw[:2] == b"PK"  # an .npz (zip) archive, not a pickle
        assert 0 < client.ttl(REDIS_PREFIX + key) <= 600
        client.set(REDIS_PREFIX + "garbage", b"\x80\x04not an npz")
    finally:
        client.close()

    async def corrupt():
        cache = PromptCache(4, redis_url=redis_url)
        try:
            return await cache.get("garbage")
        finally:
            await cache.close()

    assert asyncio.run(corrupt()) is None


def test_redis_down_degrades_to_memory():
    from cosyvoice.triton.server import free_port

    async def main():
        cache = PromptCache(4, redis_url=f"redis://127.0.0.1:{free_port()}/0")
        try:
            missing = await cache.get("k")
            await cache.put("k", _prompt(1))  # logged, not raised
            return missing, await cache.get("k")
        finally:
            await cache.close()

    missing, found = asyncio.run(main())
    assert missing is None and found is not None


def test_bad_input_is_refused_before_triton(tmp_path, pool):
    path = str(tmp_path / "spk2info.pt")

    async def main():
        registry = SpeakerRegistry(path, pool=pool, cache=PromptCache(8))
        await registry.register("carol", voice(1.2, seed=8), "hi")
        calls = dict(pool.calls)
        for bad in ("", "has space", "x" * 65, "../etc", "ünï", "a/b"):
            with pytest.raises(ValueError, match="speaker id"):
                await registry.register(bad, voice(1.2), "hi")
        with pytest.raises(ValueError, match="already registered; pass overwrite=True"):
            await registry.register("carol", voice(1.2, seed=9), "again")
        for wav, message in ((voice(0.5), "0.50 s"), (voice(30.5), "30.50 s"), (np.zeros((2, 32000), np.float32), "mono"),
                             ((voice(2) * 32767).astype(np.int16), "float samples"),
                             (np.full(32000, np.nan, np.float32), "NaN")):
            with pytest.raises(ValueError, match=message):
                await registry.register("dave", wav, "hi")
            with pytest.raises(ValueError, match=message):
                await registry.prompt_from_audio(wav, "hi")
        with pytest.raises(ValueError, match="prompt text"):
            await registry.register("dave", voice(1.2), "   ")
        assert pool.calls == calls
        await registry.register("carol", voice(1.2, seed=9), "again", overwrite=True)
        return registry

    registry = asyncio.run(main())
    assert registry.get("carol").text == "again"
    with pytest.raises(UnknownSpeaker, match=r"unknown speaker 'nobody'; registered: carol") as error:
        registry.get("nobody")
    assert isinstance(error.value, KeyError) and str(error.value).startswith("unknown speaker")
    with pytest.raises(UnknownSpeaker):
        registry.delete("nobody")


def test_concurrent_registrations_from_two_workers_are_all_kept(tmp_path, pool):
    path = str(tmp_path / "spk2info.pt")

    async def main():
        worker_a = SpeakerRegistry(path, pool=pool, cache=PromptCache(8))
        worker_b = SpeakerRegistry(path, pool=pool, cache=PromptCache(8))
        await asyncio.gather(worker_a.register("s1", voice(1.1, seed=10), "one"),
                             worker_b.register("s2", voice(1.1, seed=11), "two"),
                             worker_a.register("s3", voice(1.1, seed=12), "three"))
        return worker_a, worker_b

    worker_a, worker_b = asyncio.run(main())
    assert sorted(torch.load(path, weights_only=True)) == ["s1", "s2", "s3"]
    assert worker_a.speakers() == worker_b.speakers() == ["s1", "s2", "s3"]
