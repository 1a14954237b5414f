"""The tiny CosyVoice1 recipe as the GAN tests train it."""

from pathlib import Path

TINY_V1 = str(Path(__file__).resolve().parents[2] / "configs" / "cosyvoice-tiny.yaml")


def small_gan_recipe(folder: Path, recipe: str = TINY_V1) -> str:
    """``recipe`` with GAN batches of 4 crops of 5 mel frames (1280 samples at 22.05 kHz), written into ``folder``:
    the discriminators have upstream's fixed widths, so the HiFT step costs what its audio does."""
    text = Path(recipe).read_text()
    for old, new in (("    max_frames_in_batch: 2000", "    max_frames_in_batch: 20"),
                     ("    truncate_length: 9216", "    truncate_length: 1280")):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = Path(folder) / "cosyvoice-tiny-gan.yaml"
    path.write_text(text)
    return str(path)
