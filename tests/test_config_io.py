"""Config files by path[:variant] with field=value overrides, as the teco-ssm command loads them."""
import pytest

from teco_ssm.config_io import load_config


def test_variant_and_overrides():
    config = load_config("configs/mazelab.py:convt3", ["backbone=s5", "batch_size=4", "dataset.path=/data/maze",
                                                       "optim.s5.lr=1", "convt3.n_layers=3", "optim.s5.ssm_lr=0.5"])
    assert (config.backbone, config.batch_size, config.dataset.path) == ("s5", 4, "/data/maze")
    assert config.optim.s5.lr == 1.0 and isinstance(config.optim.s5.lr, float)
    assert config.optim.s5.ssm_lr == 0.5 and config.optim.convt3.lr == 3e-3
    assert config.convt3.n_layers == 3


def test_installed_configs_found_when_path_is_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/mazelab.py:s5").backbone == "s5"


@pytest.mark.parametrize("override,message", [
    ("batchsize=3", "no field batchsize; fields of config: backbone, batch_size"),
    ("optim.convs5.learning_rate=1", "no field optim.convs5.learning_rate"),
    ("optim.lr=1", "no field optim.lr; fields of optim: convs5, convt3, s5, transformer"),
    ("nosuch.group.x=1", "no field nosuch"),
    ("batch_size", "must look like field.name=value"),
])
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("configs/mazelab.py", [override])


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="configs/nope.py"):
        load_config("configs/nope.py")
