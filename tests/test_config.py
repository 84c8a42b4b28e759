import pytest

from pipelines.config import load_config


def test_defaults_file_and_overrides(tmp_path):
    cfg = load_config()
    assert cfg.services.host == "127.0.0.1"
    path = tmp_path / "c.toml"
    path.write_text("[demo]\nidentities = 5\nlabel_noise = 0\n[services]\nmlflow_port = 5100\n")
    cfg = load_config(path, ["demo.seed=9", "services.mlflow_port=5200"])
    assert cfg.demo.identities == 5
    assert cfg.demo.label_noise == 0.0 and isinstance(cfg.demo.label_noise, float)
    assert cfg.demo.seed == 9
    assert cfg.services.mlflow_port == 5200  # the command line wins over the file


@pytest.mark.parametrize("text, message", [
    ("[demo]\nidentitys = 5\n", "unknown key 'demo.identitys'"),
    ("[nope]\nx = 1\n", "unknown config section"),
    ("[demo]\nidentities = 'many'\n", "should be int"),
])
def test_bad_config_files_are_named(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(path)


def test_bad_override():
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["identities=3"])
    with pytest.raises(ValueError):
        load_config(None, ["demo.identities=three"])


def test_config_show_round_trips_and_names_each_values_origin(tmp_path):
    """`arcface config show --origins`: TOML that --config reads back, every value annotated."""
    import tomllib

    from pipelines.config import to_toml

    base = tmp_path / "site.toml"
    base.write_text("[services]\nmlflow_port = 5100\n")
    path = tmp_path / "c.toml"
    path.write_text("[train]\nlr = 0.05\n[margin.cosface]\nm = 0.4\n")
    env = {"ARCFACE_CONFIG": str(base), "RAY_ADDRESS": "http://127.0.0.1:8265", "ARCFACE_STATE_DIR": str(tmp_path)}
    cfg = load_config(path, ["train.batch_size=32"], environ=env)
    text = to_toml(cfg, origins=True)
    lines = dict(l.split(" = ", 1) for l in text.splitlines() if " = " in l)
    assert f"# file {base}" in text.split("mlflow_port = 5100")[1].splitlines()[0]
    assert f"0.05  # file {path}" in text and f"m = 0.4  # file {path}" in text
    assert "batch_size = 32  # --set" in text
    assert 'ray_address = "http://127.0.0.1:8265"  # environment RAY_ADDRESS' in text
    assert "# derived from services.state_dir" in text.split("storage = ")[1].splitlines()[0]
    assert lines["epochs"].endswith("# default")
    saved = tmp_path / "saved.toml"
    saved.write_text(text)  # the comments are TOML comments: it reads back to the same config
    assert tomllib.loads(text)["train"]["lr"] == 0.05
    again = load_config(saved, environ={})
    assert to_toml(again) == to_toml(cfg)


def test_every_numeric_setting_has_a_range_and_the_defaults_lie_in_it():
    from pipelines.config import RANGES, Config, numeric_settings, validate

    names = set(numeric_settings(Config()))
    assert names - set(RANGES) == set(), "numeric settings without a range in pipelines/config.RANGES"
    assert set(RANGES) - names == set(), "ranges for settings that do not exist"
    validate(Config())


@pytest.mark.parametrize("override, message", [
    ("demo.label_noise=1.5", r"demo.label_noise must be in \[0, 1\]"),
    ("services.mlflow_port=70000", "services.mlflow_port must be in"),
    ("clean.jpeg_quality=0", "clean.jpeg_quality"),
    ("train.momentum=1", r"train.momentum must be in \[0, 1\)"),
    ("denoise.max_angle=181", r"denoise.max_angle must be in \[0, 180\]"),
    ("margin.arcface.m=-0.1", "margin.arcface.m"),
    ("clean.min_blur=nan", "finite"),
])
def test_values_out_of_range_are_named_with_their_range(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override], environ={})
