"""Chapter 11d: the training configuration and the paper's recipes — every field
validated with its name in the message, JSON round trips, overrides with hints, and
each recipe value against the sentence of the paper or the release it comes from."""
import json

import pytest

from hitlib import recipes


@pytest.mark.parametrize("field, value", [
    ("batch_size", 0), ("steps", -1), ("steps", 2.5), ("g_lr", 0.0), ("d_lr", float("nan")), ("adam_b1", 1.0),
    ("adam_b2", -0.1), ("loss", "wasserstein"), ("r1_gamma", -1.0), ("bcr_weight", True), ("ema_decay", 1.5),
    ("ema_start", -1), ("d_max_channels", 0), ("flip", "yes"), ("seed", -3), ("checkpoint_every", 0),
    ("bcr_policy", "color,rotate"), ("generator", "tiny-ish"), ("generator_overrides", ("widths=30,16,8",)),
    ("generator_overrides", "latent_dim=8"), ("data", ""),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        recipes.TrainConfig(**{field: value})


def test_config_round_trips_through_json():
    config = recipes.train_config("tiny", ["steps=7", "g_lr=3e-4", "flip=true", "latent_dim=32", "data=none"])
    assert (config.steps, config.g_lr, config.flip, config.data) == (7, 3e-4, True, None)
    assert config.generator_overrides == ("latent_dim=32",) and config.generator_config.latent_dim == 32
    assert recipes.TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        recipes.TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="unknown key 'widht'; did you mean 'widths'"):
        recipes.train_config("tiny", ["widht=3"])
    with pytest.raises(ValueError, match="unknown key 'bach_size'; did you mean 'batch_size'"):
        recipes.train_config("tiny", ["bach_size=4"])  # a training key's hint, not a generator key's
    with pytest.raises(ValueError, match="unknown recipe 'ffhq256'; did you mean 'ffhq-256'"):
        recipes.train_config("ffhq256")
    with pytest.raises(ValueError, match="steps"):
        recipes.train_config("tiny", ["steps=many"])



# Each recipe value against its source. "§4.2" is the paper's "Training details" (section 4.2), "§4.1" its "Datasets"
# and "Evaluation metrics", "facts" the release's behaviour (the book's appendix, "Where the paper is silent").
PAPER_VALUES = {
    "adam_b1": 0.0, "adam_b2": 0.99,  # §4.2: "Adam ... with β1 = 0 and β2 = 0.99"
    "loss": "logistic",  # §4.2: "a standard non-saturating logistic GAN loss"
    "r1_gamma": 10.0,  # §4.2: "The gradient penalty weight is set to 10"
    "ema_decay": 0.999, "ema_start": 10,  # facts, Training: "EMA ... decay 0.999, starting at step 10"
    "flip": True,  # facts, Training: "random horizontal flips of real images"
    "d_max_channels": 512, "d_minibatch_std": False,  # facts, Discriminator: widths up to 512; minibatch std off
}
RECIPE_VALUES = {
    # generator, batch (§4.2: 256 at 128/256, 32 at 1024), steps (§4.2: 1M ImageNet, 500k FFHQ / CelebA-HQ),
    # learning rate (§4.2: 1e-4, halved with bCR), bCR weight (§4.2: 10 on FFHQ / CelebA-HQ; not at 1024, Table 3),
    # discriminator multiplier (facts: 2 for faces, 1 for ImageNet), crop (§4.1 / facts: 0.875 random crops on
    # ImageNet), evaluation samples (§4.1: 50,000; 30,000 on CelebA-HQ) and split (§4.1).
    "ffhq-256": ("hit-b-256", 256, 500_000, 5e-5, 10.0, 2, 1.0, 50_000, "train"),
    "ffhq-256-s": ("hit-s-256", 256, 500_000, 5e-5, 10.0, 2, 1.0, 50_000, "train"),
    "ffhq-256-l": ("hit-l-256", 256, 500_000, 5e-5, 10.0, 2, 1.0, 50_000, "train"),
    "celebahq-256": ("hit-b-256", 256, 500_000, 5e-5, 10.0, 2, 1.0, 30_000, "train"),
    "ffhq-1024": ("hit-b-1024", 32, 500_000, 1e-4, 0.0, 2, 1.0, 50_000, "train"),
    "celebahq-1024": ("hit-b-1024", 32, 500_000, 1e-4, 0.0, 2, 1.0, 30_000, "train"),
    "imagenet-128": ("hit-l-128", 256, 1_000_000, 1e-4, 0.0, 1, 0.875, 50_000, "validation"),
}


@pytest.mark.parametrize("name", sorted(RECIPE_VALUES))
def test_recipes_hold_the_papers_values(name):
    recipe = recipes.train_config(name)
    generator, batch, steps, lr, bcr, multiplier, crop, samples, split = RECIPE_VALUES[name]
    assert (recipe.recipe, recipe.generator, recipe.batch_size, recipe.steps) == (name, generator, batch, steps)
    assert (recipe.g_lr, recipe.d_lr, recipe.bcr_weight, recipe.d_channel_multiplier) == (lr, lr, bcr, multiplier)
    assert (recipe.crop_fraction, recipe.eval_samples, recipe.eval_split) == (crop, samples, split)
    assert recipe.bcr_policy == "color,translation,cutout"  # facts, Training: DiffAugment's policy for bCR
    assert {field: getattr(recipe, field) for field in PAPER_VALUES} == PAPER_VALUES
    assert recipe.generator_config.latent_dim == (256 if name == "imagenet-128" else 512)  # facts, Generator: input
    overridden = recipes.train_config(name, ["g_lr=3e-5", "latent_dim=128"])  # any field is still overridable
    assert overridden.g_lr == 3e-5 and overridden.generator_config.latent_dim == 128


def test_every_recipe_is_tested_and_tiny_stays_the_cpu_recipe():
    assert set(recipes.RECIPES) == set(RECIPE_VALUES) | {"tiny"}
    tiny = recipes.train_config()
    assert (tiny.recipe, tiny.generator, tiny.steps, tiny.batch_size, tiny.data) == ("tiny", "tiny", 2000, 16, None)
