import pytest
import torch

from gpt_tinystories.config import PRESETS, ModelConfig
from gpt_tinystories.errors import UserError
from gpt_tinystories.model import GPT


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("vocab_size", [4096, 50257])
def test_counted_parameters_match_the_module(preset, vocab_size):
    config = ModelConfig.from_preset(preset, vocab_size)
    with torch.device("meta"):  # shapes only: the 152M-parameter preset costs no memory
        model = GPT(config)
    assert config.num_parameters() == model.num_parameters()
    assert config.num_parameters(non_embedding=True) == model.num_parameters(non_embedding=True)


def test_preset_shapes_follow_the_tinystories_paper():
    shapes = {name: (p["d_model"], p["n_layer"]) for name, p in PRESETS.items()}
    assert shapes == {
        "1M": (64, 8),
        "3M": (128, 8),
        "8M": (256, 8),
        "28M": (512, 8),
        "33M": (768, 4),
        "28M-seed": (1024, 8),
    }
    # The original repo's "28M" really had 152M parameters with GPT-2's vocabulary.
    assert round(ModelConfig.from_preset("28M-seed", 50257).num_parameters() / 1e6) == 153
    assert ModelConfig.from_preset("1M", 4096).context_length == 512


def test_overrides_and_round_trip():
    config = ModelConfig.from_preset("8M", 4096, context_length=256, dropout=0.1)
    assert (config.d_model, config.context_length, config.dropout) == (256, 256, 0.1)
    assert ModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: ModelConfig(vocab_size=100, d_model=100, n_head=16), ["d_model=100", "n_head=16", "1, 2, 4, 5"]),
        (lambda: ModelConfig(vocab_size=100, n_layer=0), ["n_layer", "positive integer"]),
        (lambda: ModelConfig(vocab_size=-5), ["vocab_size", "-5"]),
        (lambda: ModelConfig(vocab_size=100, context_length=2.5), ["context_length"]),
        (lambda: ModelConfig(vocab_size=100, dropout=1.0), ["dropout", "[0, 1)"]),
        (lambda: ModelConfig(vocab_size=100, attention_dropout=-0.1), ["attention_dropout must be in [0, 1)", "-0.1"]),
        (lambda: ModelConfig.from_preset("7M", 100), ["unknown preset '7M'", "1M, 3M, 8M, 28M, 33M, 28M-seed"]),
        (lambda: ModelConfig.from_preset("1M", 100, width=3), ["unknown key(s) width", "d_model"]),
        (lambda: ModelConfig(vocab_size=100, position="alibi"), ["position must be one of learned, rope, none"]),
        (lambda: ModelConfig(vocab_size=100, n_head=16, n_kv_head=3), ["n_kv_head must divide n_head=16", "3"]),
        (lambda: ModelConfig(vocab_size=100, d_model=60, n_head=20, position="rope"), ["even head size", "3"]),
    ],
)
def test_invalid_configs_name_the_field_and_allowed_values(make, words):
    with pytest.raises(UserError) as error:
        make()
    for word in words:
        assert word in str(error.value)
