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


@pytest.mark.parametrize("overrides, message", [
    (["train.warmup_steps=100", "train.warmup_epochs=2"], "both set: warm up in steps or in epochs, not both"),
    (["train.gradient_accumulation=0"], r"train.gradient_accumulation must be in \[1, inf\)"),
    (["train.batch_size=80", "train.workers=8", "train.gradient_accumulation=4"],
     "does not split into 8 workers x 4 micro-batches"),
    (["margin.interclass_filtering_threshold=1.0"], r"margin.interclass_filtering_threshold must be in \[0, 1\)"),
    (["train.num_classes=-1"], r"train.num_classes must be in \[0, inf\)"),
])
def test_recipe_options_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides, environ={})


def test_recipe_options_declare_range_and_meaning_beside_the_field():
    import dataclasses

    from pipelines.config import RANGES
    from pipelines.training.config import MarginConfig, TrainConfig

    fields = {f"train.{f.name}": f for f in dataclasses.fields(TrainConfig)}
    fields.update({f"margin.{f.name}": f for f in dataclasses.fields(MarginConfig)})
    for name in ("train.warmup_epochs", "train.gradient_accumulation", "train.num_classes", "train.num_images",
                 "margin.interclass_filtering_threshold"):
        assert RANGES[name] == fields[name].metadata["range"] and fields[name].metadata["doc"]
    cfg = load_config(None, ["train.warmup_epochs=2", "train.gradient_accumulation=2"], environ={})
    assert cfg.train.warmup_steps_for(100) == 200 and cfg.train.warmup_epochs == 2.0


def test_warmup_in_epochs_counts_this_datas_steps():
    from pipelines.training.config import TrainConfig
    from pipelines.training.step import lr_at

    cfg = TrainConfig(lr=0.1, warmup_epochs=0.5, poly_power=1.0)
    assert lr_at(0, cfg, total_steps=100, steps_per_epoch=20) == pytest.approx(0.01)  # 10 warm-up steps
    assert lr_at(9, cfg, total_steps=100, steps_per_epoch=20) == pytest.approx(0.1)
    assert lr_at(55, cfg, total_steps=100, steps_per_epoch=20) == pytest.approx(0.05)  # halfway down
    with pytest.raises(ValueError, match="steps per epoch"):
        lr_at(0, cfg, total_steps=100)


def test_a_reference_table_is_kept_and_shown(tmp_path):
    from pipelines.config import to_toml

    path = tmp_path / "recipe.toml"
    path.write_text('[reference]\nsource = "zoo"\n"ijbc_tar_at_far_1e-4" = 96.37\nval_targets = ["lfw", "cfp_fp"]\n')
    cfg = load_config(path, environ={})
    assert cfg.reference == {"source": "zoo", "ijbc_tar_at_far_1e-4": 96.37, "val_targets": ["lfw", "cfp_fp"]}
    text = to_toml(cfg, origins=True)
    assert f'source = "zoo"  # file {path}' in text.split("[reference]")[1]
    assert load_config(None, environ={}).reference == {}
