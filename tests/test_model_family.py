"""The model family a recipe trains decides the speech tokenizer, the token checks and the export (one setting)."""

import pytest

from cosyvoice.model_family import COSYVOICE1, COSYVOICE2, COSYVOICE3, family_by_name, recipe_family

UPSTREAM_V1 = "llm: !new:cosyvoice.llm.llm.TransformerLM\n    speech_token_size: 4096\n"


@pytest.mark.parametrize("recipe, family", [
    ("configs/cosyvoice.yaml", COSYVOICE1), ("configs/cosyvoice-tiny.yaml", COSYVOICE1),
    ("configs/cosyvoice2.yaml", COSYVOICE2), ("configs/cosyvoice2-tiny.yaml", COSYVOICE2),
    ("configs/cosyvoice3.yaml", COSYVOICE3), (UPSTREAM_V1, COSYVOICE1),
    ("flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec\n    input_size: 512\n", COSYVOICE1),  # a model-dir yaml
])
def test_the_recipe_names_its_family_by_the_class_it_builds(recipe, family):
    assert recipe_family(recipe) is family


def test_only_cosyvoice1_refuses_the_trtllm_export_and_its_tokens_are_50hz_v1():
    assert COSYVOICE1.trtllm_unsupported and not COSYVOICE2.trtllm_unsupported and not COSYVOICE3.trtllm_unsupported
    assert (COSYVOICE1.speech_tokenizer, COSYVOICE1.tokenizer_version) == ("speech_tokenizer_v1.onnx", "v1")
    assert (COSYVOICE1.tokens_per_second, COSYVOICE1.codebook_size, COSYVOICE1.sample_rate) == (50, 4096, 22050)
    assert family_by_name("cosyvoice2") is COSYVOICE2


def test_a_tokenizer_of_another_generation_is_refused_naming_the_fix():
    COSYVOICE1.check_tokenizer("", "", "r.yaml")  # empty: follow the recipe
    COSYVOICE1.check_tokenizer("my/speech_tokenizer_v1.onnx", "v1", "r.yaml")
    with pytest.raises(ValueError, match=r"cosyvoice1 recipe.*'speech_tokenizer_v2.onnx' makes v2 tokens.*"
                                         r"Leave the models resource's speech_tokenizer"):
        COSYVOICE1.check_tokenizer("speech_tokenizer_v2.onnx", "", "r.yaml")
    with pytest.raises(ValueError, match="tokenizer_version is 'v1'"):
        COSYVOICE2.check_tokenizer("", "v1", "r.yaml")
    COSYVOICE2.check_tokenizer("speech_tokenizer_v2.batch.onnx", "", "r.yaml")


def test_what_is_not_a_cosyvoice_recipe_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="builds my.Model, which belongs to no known CosyVoice generation"):
        recipe_family("llm: !new:my.Model\n  a: 1\n")
    with pytest.raises(ValueError, match="not a CosyVoice recipe"):
        recipe_family("sample_rate: 22050\nx: 1\n")
    with pytest.raises(FileNotFoundError, match="COSYVOICE_TRAIN_RECIPE"):
        recipe_family(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="unknown model family"):
        family_by_name("cosyvoice9")


def test_a_model_dir_is_one_family_by_its_recipe_file_and_runtimes_read_the_same(tmp_path):
    """The dir's recipe file name picks the family (and so the acoustic runtime's rate and the BLS that serves
    it); no recipe: the CosyVoice2 runtime; two generations' recipes in one dir are refused, naming both."""
    from cosyvoice.acoustic import runtimes
    from cosyvoice.model_family import config_file_family, model_dir_family
    from cosyvoice.triton.runtime_v1 import model_family

    assert config_file_family(str(tmp_path)) is None and model_dir_family(str(tmp_path)) is None
    assert (runtimes.sample_rate(str(tmp_path)), model_family(str(tmp_path))) == (24000, "cosyvoice2")
    (tmp_path / "cosyvoice.yaml").write_text(UPSTREAM_V1)
    assert config_file_family(str(tmp_path)) is COSYVOICE1 is model_dir_family(str(tmp_path))
    assert (runtimes.sample_rate(str(tmp_path)), model_family(str(tmp_path))) == (22050, "cosyvoice")
    assert runtimes.SAMPLE_RATES == {"cosyvoice": 22050, "cosyvoice2": 24000}
    (tmp_path / "cosyvoice2.yaml").write_text("flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec\n  a: 1\n")
    with pytest.raises(ValueError, match=r"cosyvoice.yaml \(cosyvoice1\) and cosyvoice2.yaml \(cosyvoice2\); a model "
                                         r"dir is one generation"):
        runtimes.acoustic_generation(str(tmp_path))
    (tmp_path / "cosyvoice.yaml").unlink()
    assert model_dir_family(str(tmp_path)) is COSYVOICE2 and runtimes.sample_rate(str(tmp_path)) == 24000
