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
