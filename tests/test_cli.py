"""cli: configs by name or path, overrides in order with exact error names, tables."""

import pytest

from nerveseg_jax import cli


def test_configs_by_name_and_by_path_are_the_same():
  by_name = cli.load_config("unet:smoke")
  by_path = cli.load_config("configs/unet.py:smoke")
  assert by_name.to_dict() == by_path.to_dict()
  assert {"unet", "classifier"} <= set(cli.known_configs())
  assert "smoke" in cli.config_variants("unet")


@pytest.mark.parametrize("arg, needle", [
    ("", "--config is required; known: "),
    ("unte", "--config unte: no such config; known: "),
    ("configs/nope.py", "--config configs/nope.py: no such file"),
    ("unet:smok", "unknown variant 'smok'"),
])
def test_bad_config_names_what_was_given_and_what_exists(arg, needle):
  with pytest.raises(cli.ConfigError) as e:
    cli.load_config(arg)
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_overrides_typed_and_in_order():
  c = cli.load_config("unet:smoke")
  rest, overrides = cli.split_overrides(
      ["--workdir=w", "--config.seed=3", "--config.data.image_size", "(32, 48)",
       "--config.learning_rate=1", "--config.model.presence_head=false",
       "--config.seed=4", "--config.init_from=/x"])
  assert rest == ["--workdir=w"]
  cli.apply_overrides(c, overrides)
  assert c.seed == 4 and tuple(c.data.image_size) == (32, 48)
  assert c.learning_rate == 1.0 and isinstance(c.learning_rate, float)
  assert c.model.presence_head is False and c.init_from == "/x"


@pytest.mark.parametrize("overrides, key", [
    ([("seed", "1"), ("model.featurez", "8")], "model.featurez"),
    ([("model.featurez", "8"), ("seed", "1")], "model.featurez"),
    ([("seed", "1"), ("data.nope.deeper", "1")], "data.nope.deeper"),
])
def test_unknown_key_is_named_wherever_it_stands(overrides, key):
  c = cli.load_config("unet:smoke")
  with pytest.raises(cli.ConfigError, match=f"unknown config key '{key}'"):
    cli.apply_overrides(c, overrides)


def test_wrong_type_is_named():
  c = cli.load_config("unet:smoke")
  with pytest.raises(cli.ConfigError, match="--config.batch_size=eight"):
    cli.apply_overrides(c, [("batch_size", "eight")])


def test_parse_exits_with_one_line(capsys):
  p = cli.parser("prog", "d")
  cli.add_config(p)
  with pytest.raises(SystemExit) as e:
    cli.parse(p, ["--config", "unet:smoke", "--config.model.featurez=8"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: unknown config key 'model.featurez'") and "\n" not in err
  args = cli.parse(p, ["--config", "unet:smoke", "--config.seed=7"])
  assert args.config.seed == 7 and args.config_arg == "unet:smoke"


def test_table_aligns():
  out = cli.table([["a", 0.5], ["long", 1]], header=["k", "v"])
  assert out.splitlines() == ["k     v", "----  ------", "a     0.5000", "long  1"]


def test_run_turns_user_errors_into_one_line(capsys):
  def main(argv):
    raise FileNotFoundError("--images /x: no such folder")
  assert cli.run(main, []) == 2
  assert capsys.readouterr().err == "error: --images /x: no such folder\n"
