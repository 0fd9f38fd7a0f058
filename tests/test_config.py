"""Chapter 6: presets reproduce Table 9 / A.2 / the release; overrides; impossible configs fail naming the field."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hitlib.config import PRESETS, GeneratorConfig, get_config, stages_for_resolution
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
        ("tiny", ["latent_dim=0"], "latent_dim must be a positive integer"),
        ("tiny", ["latent_dim=abc"], "expected an integer"),
        ("tiny", ["attention_stages=3"], "attention_stages=3 must be in [0, 2]"),
        ("tiny", ["norm"], "must look like key=value"),
        ("tiny", ["num_heads=2,4,4", "widths=130,64,32"], "widths[0]=130 must be divisible by 4"),
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
        with pytest.raises(ValueError, match="resolution must be 8"):
            stages_for_resolution(resolution)


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
