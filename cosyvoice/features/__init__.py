"""Feature extraction: kaldi fbank + CMN, whisper log-mel, ONNX runners, reference models."""
