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


def test_every_setting_declares_its_values_and_meaning_beside_its_field_and_the_defaults_lie_in_them():
    """One declaration per setting, beside its dataclass field: a doc for every one, a range
    for every number, the choices of every value from a fixed set; no table elsewhere."""
    import pipelines.config as config
    from pipelines.config import Config, declared_settings, numeric_settings, validate

    settings = declared_settings(Config())
    assert len(settings) > 100 and "margin.arcface.m" in settings and "origins" not in settings
    for name, (value, declared) in settings.items():
        assert declared.get("doc"), f"{name} has no doc beside its field"
        if name in numeric_settings(Config()):
            assert "range" in declared, f"{name} is a number without a range beside its field"
        if "choices" in declared:
            assert value in declared["choices"], f"{name}'s default is not one of its choices"
    choice_settings = {name for name, (_, declared) in settings.items() if "choices" in declared}
    assert {"train.amp", "train.channels_last", "train.optimizer", "margin.type", "demo.rec_order"} <= choice_settings
    assert not hasattr(config, "RANGES")
    for table in (v for v in vars(config).values() if isinstance(v, dict)):
        assert not set(table) & set(settings), "a table of settings kept apart from their fields"
    validate(Config())


@pytest.mark.parametrize("override, message", [
    ("demo.label_noise=1.5", r"demo.label_noise must be in \[0, 1\]"),
    ("services.mlflow_port=70000", "services.mlflow_port must be in"),
    ("clean.jpeg_quality=0", "clean.jpeg_quality"),
    ("train.momentum=1", r"train.momentum must be in \[0, 1\)"),
    ("denoise.max_angle=181", r"denoise.max_angle must be in \[0, 180\]"),
    ("margin.arcface.m=-0.1", "margin.arcface.m"),
    ("margin.combined.m2=3.1416", r"margin.combined.m2 must be in \[0, pi\)"),
    ("demo.workers=1025", r"demo.workers must be in \[1, 1024\]"),
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
    (["train.epochs=0"], r"train.epochs must be >= 1 \(or set train.max_steps\)"),
    (["train.compile=true"], "inductor backend crashed on CPU.*aot_eager"),
])
def test_recipe_options_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides, environ={})


@pytest.mark.parametrize("overrides", [
    ["train.epochs=0", "train.max_steps=10"],
    ["train.compile=true", "train.gpu=true"],
    ["train.compile=true", "train.compile_backend=aot_eager"],
])
def test_what_the_rules_between_settings_allow_is_taken(overrides):
    load_config(None, overrides, environ={})


@pytest.mark.parametrize("override, message", [
    ("train.amp=fp8", "train.amp must be one of auto, bf16, fp16, off, got 'fp8'"),
    ("train.channels_last=yes", "train.channels_last must be one of auto, on, off, got 'yes'"),
    ("train.optimizer=adam", "train.optimizer must be one of sgd, adamw, got 'adam'"),
    ("margin.type=arcfce", "margin.type must be one of arcface, cosface, sphereface, combined, got 'arcfce'"),
    ("demo.rec_order=sorted", "demo.rec_order must be one of index, face2rec2, got 'sorted'"),
])
def test_values_out_of_their_choices_are_refused_naming_the_choices(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override], environ={})


def test_origins_are_bookkeeping_not_a_setting(tmp_path):
    from pipelines.config import Config, to_toml

    cfg = load_config(None, ["train.lr=0.05"], environ={})
    assert cfg.origins == {"train.lr": "--set", "train.storage": "derived from services.state_dir"}
    assert "origins" not in cfg.to_dict() and "origins" not in to_toml(cfg)
    assert Config().origins == {} and Config().origins is not Config().origins
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["origins.train=x"], environ={})
    path = tmp_path / "c.toml"
    path.write_text('[origins]\n"train.lr" = "x"\n')
    with pytest.raises(ValueError, match="unknown config section"):
        load_config(path, environ={})


def test_recipe_options_declare_range_and_meaning_beside_the_field():
    import dataclasses

    from pipelines.training.config import MarginConfig, TrainConfig

    fields = {f"train.{f.name}": f for f in dataclasses.fields(TrainConfig)}
    fields.update({f"margin.{f.name}": f for f in dataclasses.fields(MarginConfig)})
    for name in ("train.warmup_epochs", "train.gradient_accumulation", "train.num_classes", "train.num_images",
                 "margin.interclass_filtering_threshold"):
        assert fields[name].metadata["range"] and fields[name].metadata["doc"]
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
