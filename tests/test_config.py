"""Chapter 6: presets reproduce Table 9 / A.2 / the release; overrides; impossible configs fail naming the field."""
import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hitlib.config import (ATTENTION_KINDS, NORM_KINDS, PRESETS, GeneratorConfig,
                           get_config, parameter_counts, stages_for_resolution)
from hitlib.reference.blocking import balanced_block_size

PRESET_NAMES = ["hit-s-256", "hit-b-256", "hit-l-256", "hit-b-1024", "hit-l-128",
                "release-128", "release-256", "release-1024", "tiny"]


def test_preset_names_are_the_published_interface():
    assert sorted(PRESETS) == sorted(PRESET_NAMES)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_are_valid_and_consistent(name):
    config = get_config(name)
    assert config.name == name
    assert [s.resolution for s in config.stages] == [8 * 2**i for i in range(config.num_stages)]
    assert config.stages[-1].resolution == config.resolution
    assert not config.stages[-1].is_low_resolution


def test_table9_hit_b_and_release():
    b = get_config("hit-b-256")
    assert b.widths == (512, 512, 256, 128, 64, 64)
    assert b.num_layers == (2, 2, 2, 2, 1, 1)
    assert b.num_heads == (16, 8, 4, 4, 4, 4)
    assert b.block_sizes == (4, 4, 8, 8, None, None)
    release = get_config("release-256")
    assert (release.widths, release.num_layers, release.num_heads, release.block_sizes) == (
        b.widths, b.num_layers, b.num_heads, b.block_sizes)
    # Table 9: after stage 1 of HiT-B, "pixel shuffle, 512-d": 512/4 = 128 channels, then a dense 128 -> 512.
    assert b.stages[0].needs_transition_dense and b.stages[0].next_width == 512
    # HiT-B stage 5 -> 6: 64/4 = 16 channels, then "pixel shuffle, 64-d"; HiT-L stage 4 -> 5: 128/4 = 32 -> 128.
    assert b.stages[4].needs_transition_dense and not b.stages[5].needs_transition_dense
    assert get_config("hit-l-128").latent_dim == 256
    assert get_config("hit-l-128").widths == get_config("hit-l-256").widths[:5]


def test_balanced_blocking_matches_numpy_reference_and_release():
    config = get_config("hit-b-1024", ["block_sizes=balanced"])
    assert config.block_sizes[:4] == (4, 4, 8, 8)
    for i, s in enumerate(config.stages[:4]):
        assert s.block_size == balanced_block_size(s.resolution, s.resolution)


@pytest.mark.parametrize("a", range(5))
def test_attention_stages_override_is_table6(a):
    config = get_config("hit-l-128", [f"attention_stages={a}"])
    assert config.attention_stages == (a, 5 - a)
    assert config.block_sizes[:a] == (4, 4, 8, 8)[:a]


def test_overrides_typed_and_dict():
    config = get_config("tiny", ["norm=layer", "multi_query=false", "compute_dtype=bfloat16", "attention=axial",
                                 "num_layers=2"])
    assert (config.norm, config.multi_query, config.compute_dtype) == ("layer", False, "bfloat16")
    assert config.attention == ("axial",) * 3 and config.num_layers == (2, 2, 2)
    assert get_config("tiny", {"latent_dim": 32}).latent_dim == 32
    # Changing the resolution together with every per-stage field is allowed.
    config = get_config("tiny", ["resolution=64", "widths=128,64,32,32", "num_layers=1", "num_heads=4,4,4,4",
                                 "block_sizes=4,4,none,none", "attention=multi_axis"])
    assert config.num_stages == 4


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("hit-b-256", ["block_sizes=3,4,8,8,none,none"], "block_sizes[0]=3 does not divide that stage's resolution 8"),
        ("hit-b-256", ["num_heads=16,8,3,4,4,4"], "num_heads[2]=3 does not divide widths[2]=256"),
        ("hit-b-256", ["widhts=1,2"], "unknown override key 'widhts'; did you mean 'widths'?"),
        ("hit-b-257", [], "unknown preset 'hit-b-257'; did you mean 'hit-b-256'?"),
        ("tiny", ["resolution=48"], "resolution must be 8·2^k"),
        ("tiny", ["resolution=64"], "widths must have one entry per stage: resolution=64 needs 4 stages"),
        ("tiny", ["widths=128,64"], "widths must have one entry per stage"),
        ("tiny", ["attention=sparse"], "attention[0] must be one of"),
        ("tiny", ["num_heads=3,4,4", "widths=96,64,32"], "num_heads[0]=3 must be even"),
        ("tiny", ["block_sizes=none,4,none"], "cannot follow a high-resolution one"),
        ("tiny", ["block_sizes=4,4,4"], "at least one high-resolution stage"),
        ("tiny", ["norm=group"], "norm must be one of"),
        ("tiny", ["compute_dtype=float16"], "compute_dtype must be one of"),
        ("tiny", ["multi_query=maybe"], "multi_query"),
        ("tiny", ["latent_dim=0"], "latent_dim must be a positive integer, got latent_dim=0"),
        ("tiny", {"latent_grid": True}, "latent_grid must be a positive integer, got latent_grid=True"),
        ("tiny", {"widths": (64, 32.0, 16)}, "widths[1] must be a positive integer, got widths[1]=32.0"),
        ("tiny", ["latent_dim=abc"], "expected an integer"),
        ("tiny", ["attention_stages=3"], "attention_stages=3 must be in [0, 2]"),
        ("tiny", ["norm"], "must look like key=value"),
        ("tiny", ["num_heads=2,4,4", "widths=130,64,32"], "widths[0]=130 must be divisible by 4"),
        ("tiny", ["cross_attention=maybe"], "expected true or false"),
        ("tiny", {"cross_attention": 1}, "cross_attention must be true or false"),
        ("tiny", ["block_sizes=3"], "block_sizes[0]=3 does not divide"),
    ],
)
def test_impossible_configs_name_the_field(name, overrides, message):
    with pytest.raises(ValueError) as error:
        get_config(name, overrides)
    assert message in str(error.value)


@given(st.integers(1, 5000))
def test_stages_for_resolution(resolution):
    if resolution >= 8 and resolution & (resolution - 1) == 0:
        assert 8 * 2 ** (stages_for_resolution(resolution) - 1) == resolution
    else:
        # below 8 the integer check speaks, above it the power-of-two one
        expected = "an integer >= 8" if resolution < 8 else "8·2^k (8, 16, 32, ...)"
        with pytest.raises(ValueError) as error:
            stages_for_resolution(resolution)
        assert str(error.value) == f"resolution must be {expected}, got resolution={resolution}"


@given(st.data())
def test_random_valid_configs_construct(data):
    n = data.draw(st.integers(1, 5))
    a = data.draw(st.integers(0, n - 1))
    heads = [data.draw(st.sampled_from([2, 4, 8])) for _ in range(n)]
    widths = [h * 4 * data.draw(st.integers(1, 4)) for h in heads]
    blocks = [data.draw(st.sampled_from([b for b in (1, 2, 4, 8) if (8 * 2**i) % b == 0])) if i < a else None
              for i in range(n)]
    config = GeneratorConfig(name="random", resolution=8 * 2 ** (n - 1), latent_dim=8, widths=tuple(widths),
                             num_layers=(1,) * n, num_heads=tuple(heads), block_sizes=tuple(blocks),
                             attention=("multi_axis",) * n)
    assert config.attention_stages == (a, n - a)
    for s in config.stages:
        assert s.needs_transition_dense == (s.next_width is not None and s.width // 4 != s.next_width)


# ---- the ablation switches of Tables 5-8 (chapter 6's last section) ------------------

INR = ["cross_attention=false", "attention_stages=0"]  # Table 5's first row


def test_cross_attention_switch():
    assert all(get_config(name).cross_attention is True for name in PRESET_NAMES)
    assert get_config("tiny", ["cross_attention=false"]).cross_attention is False
    assert get_config("tiny", {"cross_attention": False}).cross_attention is False
    inr = get_config("hit-l-128", INR)
    assert (inr.cross_attention, inr.attention_stages) == (False, (0, 5))
    for bad in (1, 0.0, None):
        with pytest.raises(ValueError, match="cross_attention must be true or false"):
            get_config("tiny", {"cross_attention": bad})
    with pytest.raises(ValueError, match="cross_attention='maybe': expected true or"):
        get_config("tiny", ["cross_attention=maybe"])


def test_every_switch_of_tables_5_to_8_is_a_field():
    for kind in ATTENTION_KINDS:  # Table 5's attention rows
        config = get_config("hit-l-128", [f"attention={kind}"])
        assert config.attention[:4] == (kind,) * 4
    for norm in NORM_KINDS:  # Table 8 left
        assert get_config("hit-l-128", [f"norm={norm}"]).norm == norm
    for value, expected in (("true", True), ("false", False)):  # Table 8 right
        assert get_config("hit-l-128", [f"multi_query={value}"]).multi_query is expected
    for a in range(5):  # Table 6
        config = get_config("hit-l-128", [f"attention_stages={a}"])
        assert config.attention_stages == (a, 5 - a)


def test_one_block_size_for_every_attention_stage():
    config = get_config("hit-l-128", ["block_sizes=4"])
    assert config.block_sizes == (4, 4, 4, 4, None)
    assert get_config("hit-l-128", {"block_sizes": 2}).block_sizes == (2, 2, 2, 2, None)
    # overrides apply in order: only the attention stages left by attention_stages=2
    ordered = get_config("hit-l-128", ["attention_stages=2", "block_sizes=2"])
    assert ordered.block_sizes == (2, 2, None, None, None)
    with pytest.raises(ValueError, match="block_sizes\\[0\\]=3 does not divide"):
        get_config("hit-l-128", ["block_sizes=3"])
    with pytest.raises(ValueError, match="block_sizes\\[0\\] must be a positive"):
        get_config("hit-l-128", ["block_sizes=0"])


def test_blocks_and_tokens_per_stage():
    stages = get_config("hit-l-128").stages
    assert [(s.num_blocks, s.block_tokens) for s in stages] == [
        (4, 16), (16, 16), (16, 64), (64, 64), (None, None)]
    assert [s.is_balanced for s in stages] == [True, True, True, True, False]


def test_balanced_and_unbalanced_blocking():
    assert all(get_config(name).balanced_blocking for name in PRESET_NAMES)
    unbalanced = get_config("hit-l-128", ["block_sizes=4"])  # 256 blocks of 16 at 64 px
    assert not unbalanced.balanced_blocking
    assert [s.is_balanced for s in unbalanced.stages[:4]] == [True, True, True, False]
    # at the tiny size blocks of 4 are the balanced ones; blocks of 2 are not (16 px)
    assert get_config("tiny", ["block_sizes=4"]).balanced_blocking
    assert not get_config("tiny", ["block_sizes=2"]).balanced_blocking
    again = get_config("hit-l-128", ["block_sizes=4", "block_sizes=balanced"])
    assert again.balanced_blocking


@pytest.mark.parametrize("size", [8, 16, 32, 64, 128, 256])
def test_is_balanced_agrees_with_the_numpy_reference(size):
    "A block size is balanced when its |M - N| is that of chapter 1's balanced size."
    best = balanced_block_size(size, size)
    target = abs(best * best - (size // best) ** 2)
    stage = get_config("tiny").stages[0]
    for p in [p for p in range(1, size + 1) if size % p == 0]:
        spec = dataclasses.replace(stage, resolution=size, block_size=p)
        assert spec.num_blocks * spec.block_tokens == size * size
        assert spec.is_balanced == (abs(p * p - (size // p) ** 2) == target), (size, p)
    assert dataclasses.replace(stage, resolution=size, block_size=best).is_balanced


# The paper's parameter counts (millions) for the rows and columns where it gives one.
TABLE_COUNTS = [
    (INR, 42.68),  # Table 5: latent-code conditioned INR decoder
    (["attention_stages=0"], 61.55),  # Table 5: + cross-attention; Table 6 [0, 5]
    (["attention=full"], 67.60),
    (["attention=axial"], 67.60),
    (["attention=blocked_local"], 67.60),
    ([], 67.60),  # the full model (balanced multi-axis)
    (["attention_stages=1"], 66.01),
    (["attention_stages=2"], 67.19),
    (["attention_stages=3"], 67.52),
    (["attention_stages=4"], 67.60),
]


@pytest.mark.parametrize("overrides, millions", TABLE_COUNTS)
def test_parameter_counts_of_tables_5_and_6(overrides, millions):
    count = parameter_counts(get_config("hit-l-128", overrides))["total"]
    assert round(count / 1e6, 2) == millions


def test_inr_decoder_count_is_exact_and_only_this_reading_gives_it():
    inr = parameter_counts(get_config("hit-l-128", INR))
    assert inr["total"] == 42_683_407 and inr["latent"] == 0
    assert inr["initial"] == 256 * 64 * 1024 + 64 * 1024  # z enters here only
    with_cross = parameter_counts(get_config("hit-l-128", ["attention_stages=0"]))
    # keeping the latent embedding, or the cross-attention blocks' MLPs, misses 42.68M
    assert round((inr["total"] + with_cross["latent"]) / 1e6, 2) == 46.91
    assert round(with_cross["total"] / 1e6, 2) == 61.55


@pytest.mark.parametrize("overrides", [[], ["attention=interleaved"], ["block_sizes=4"],
                                       ["norm=layer"]])
def test_switches_without_a_paper_count_keep_the_full_models_parameters(overrides):
    "Attention kinds and blocking share weights; LayerNorm has BatchNorm's parameters."
    assert parameter_counts(get_config("hit-l-128", overrides))["total"] == 67_602_435


def test_multi_head_attention_counts_one_key_value_head_per_query_head():
    mqa = parameter_counts(get_config("hit-l-128"))["total"]
    mha = parameter_counts(get_config("hit-l-128", ["multi_query=false"]))["total"]
    assert round(mha / 1e6, 2) == 76.38 and mha > mqa


# --- modulation: GANsformer's duplex attention as an option (chapters 4a, 6) ------------------------------------------


def test_modulation_default_is_the_papers_simplex():
    assert all(get_config(name).modulation == "simplex" for name in PRESET_NAMES)
    from hitlib.config import MODULATION_KINDS
    assert MODULATION_KINDS == ("simplex", "duplex")
    # the field is last, with a default: positional construction of the other fields is unchanged
    assert [f.name for f in dataclasses.fields(GeneratorConfig)][-1] == "modulation"


def test_modulation_override_parses_like_the_other_generator_overrides():
    from hitlib.config import OVERRIDE_KEYS
    assert "modulation" in OVERRIDE_KEYS
    duplex = get_config("tiny", ["modulation=duplex"])
    assert duplex.modulation == "duplex"
    assert get_config("tiny", [" modulation = duplex "]) == duplex  # whitespace stripped, as for every key
    assert get_config("tiny", {"modulation": "duplex"}) == duplex
    assert get_config("tiny", ["modulation=duplex", "norm=layer", "multi_query=false"]).norm == "layer"
    assert get_config("tiny", ["modulation=duplex", "modulation=simplex"]) == get_config("tiny")  # in order
    with pytest.raises(ValueError, match="did you mean 'modulation'"):
        get_config("tiny", ["modulaton=duplex"])


def test_modulation_reaches_the_generator_through_a_recipe():
    from hitlib import recipes
    config = recipes.train_config("tiny", ["modulation=duplex"])
    assert "modulation=duplex" in config.generator_overrides
    assert get_config("tiny", list(config.generator_overrides)).modulation == "duplex"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["modulation=triplex"], "modulation must be one of ('simplex', 'duplex'), got modulation='triplex'"),
        (["modulation=Duplex"], "modulation must be one of ('simplex', 'duplex'), got modulation='Duplex'"),
        ({"modulation": None}, "modulation must be one of"),
        (["modulation=duplex", "cross_attention=false"], "modulation='duplex' updates the latent tokens that "
                                                        "cross-attention reads: it needs cross_attention=true"),
        (["cross_attention=false", "attention_stages=0", "modulation=duplex"], "it needs cross_attention=true"),
    ],
)
def test_bad_modulation_names_the_field(overrides, message):
    with pytest.raises(ValueError) as error:
        get_config("tiny", overrides)
    assert message in str(error.value)


def latent_update_count(width, heads, c0, multi_query=True):
    "Layer norm [C], query [C0, h, d] + [h, d], key/value [C, d] + [d] (or per head), out [h, d, C0] + [C0], norm [C0]."
    d = width // heads
    kv = d if multi_query else heads * d
    return 2 * width + (c0 * heads * d + heads * d) + 2 * (width * kv + kv) + (heads * d * c0 + c0) + 2 * c0


@pytest.mark.parametrize("name", ["hit-l-128", "tiny", "hit-b-256"])
@pytest.mark.parametrize("multi_query", [True, False])
def test_duplex_adds_one_latent_update_per_stage(name, multi_query):
    extra = [] if multi_query else ["multi_query=false"]
    simplex = parameter_counts(get_config(name, extra))
    config = get_config(name, extra + ["modulation=duplex"])
    duplex = parameter_counts(config)
    c0 = config.widths[0]
    added = [latent_update_count(s.width, s.num_heads, c0, multi_query) for s in config.stages]
    assert [d - s for d, s in zip(duplex["stages"], simplex["stages"])] == added
    assert duplex["latent"] == simplex["latent"] and duplex["initial"] == simplex["initial"]
    assert duplex["total"] == simplex["total"] + sum(added)


def test_duplex_parameter_counts_at_imagenet_128_and_tiny():
    # the numbers chapter 6 prints: 67.60M -> 72.06M at ImageNet 128, 1,185,683 -> 1,255,715 at tiny
    assert parameter_counts(get_config("hit-l-128", ["modulation=duplex"]))["total"] == 72_064_515
    assert parameter_counts(get_config("tiny"))["total"] == 1_185_683
    assert parameter_counts(get_config("tiny", ["modulation=duplex"]))["total"] == 1_255_715
