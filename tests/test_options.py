"""featshard.options: one config dataclass is the API's keywords and the CLI's options (every option of every
command maps to a field, with the field's default); types checked; passed-through options; Command."""
from __future__ import annotations

import argparse
import dataclasses
import inspect

import pytest

from featshard import cli
from featshard.errors import UsageError
from featshard.options import add_options, check_types, from_namespace, option, takes, to_argv
from featshard.runner.config import RunConfig, SlurmConfig


@dataclasses.dataclass
class Toy:
    path: str = option(help="a path", positional=True)
    count: int = option(3, "how many")
    ratio: float = option(0.5, "a ratio")
    name: str | None = option(None, "a name")
    colour: str = option("red", "a colour", choices=("red", "blue"))
    normalize: bool = option(True, "keep raw", flag="--no-normalize")
    verbose: bool = option(False, "say more")
    gpu: bool | None = option(None, "GPU or not (default: auto)")
    tags: list[str] = option([], "a tag", flag="--tag")
    secret: int = option(7, "API only", cli=False)

    def __post_init__(self) -> None:
        check_types(self)


def parse(cls: type, argv: list[str]) -> object:
    parser = argparse.ArgumentParser()
    add_options(parser, cls)
    return from_namespace(cls, parser.parse_args(argv))


def test_defaults_flags_and_types() -> None:
    assert parse(Toy, ["p"]) == Toy("p")
    got = parse(Toy, ["p", "--count", "5", "--ratio", "2", "--name", "n", "--colour", "blue", "--no-normalize",
                      "--verbose", "--no-gpu", "--tag", "a", "--tag", "b"])
    assert got == Toy("p", 5, 2.0, "n", "blue", False, True, False, ["a", "b"])
    assert parse(Toy, ["p", "--gpu"]).gpu is True  # type: ignore[attr-defined]
    with pytest.raises(SystemExit):
        parse(Toy, ["p", "--secret", "1"])


def test_types_and_choices_are_checked_for_the_api_too() -> None:
    assert Toy("p", ratio=1).ratio == 1.0 and isinstance(Toy("p", ratio=1).ratio, float)
    with pytest.raises(UsageError, match="--count must be int, not str"):
        Toy("p", count="5")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="--count must be int, not bool"):
        Toy("p", count=True)
    with pytest.raises(UsageError, match="--colour 'green': choose from red, blue"):
        Toy("p", colour="green")
    with pytest.raises(UsageError, match="--tag must be str"):
        Toy("p", tags=[1])  # type: ignore[list-item]
    with pytest.raises(UsageError, match="PATH must not be None"):
        Toy(None)  # type: ignore[arg-type]


def test_to_argv_gives_back_what_parses_to_the_same_values() -> None:
    values = {"count": 5, "normalize": False, "gpu": False, "tags": ["x", "y"], "verbose": True, "name": "n"}
    words = to_argv(Toy, values)
    assert words == ["--count", "5", "--name", "n", "--no-normalize", "--verbose", "--no-gpu", "--tag", "x", "--tag",
                     "y"]
    assert parse(Toy, ["p", *words]) == Toy("p", **values)  # type: ignore[arg-type]


def test_command_takes_the_config_signature() -> None:
    @takes(Toy)
    def double(config: Toy) -> int:
        return config.count * 2

    assert double("p") == 6 and double("p", count=4) == 8 and double.with_config(Toy("p", 10)) == 20
    sig = inspect.signature(double)
    assert list(sig.parameters)[:2] == ["path", "count"] and sig.parameters["count"].default == 3


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_cli_option_is_a_config_field_with_its_default(command: str) -> None:
    """No second list of options or defaults: each argparse option of a command is built from one field of its
    config dataclass (slurm's `run` options: from RunConfig), with that field's default."""
    cls = cli.config_class(command)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    parser = cli.build_parser([command])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    seen = set()
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        owner, _, name = action.dest.rpartition("__")
        if owner:  # a passed-through option: `run_options__model` of slurm is RunConfig's `model`
            assert fields[owner].metadata["passthrough"] is RunConfig and name in RunConfig.__dataclass_fields__
            assert action.default is argparse.SUPPRESS
            seen.add(owner)
            continue
        assert action.dest in fields, f"{command}: option {action.option_strings} has no config field"
        field = fields[action.dest]
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
        if action.default is not None or not isinstance(default, list):
            assert action.default == default or action.required, f"{command} --{action.dest}: default differs"
        seen.add(action.dest)
    cli_fields = {n for n, f in fields.items() if f.metadata.get("cli")}
    assert cli_fields == seen, f"{command}: fields without an option: {cli_fields - seen}"


def test_slurm_collects_the_run_options_it_passes_on() -> None:
    config = parse(SlurmConfig, ["--input", "l.txt", "--out", "o", "--nodes", "2", "--gpus-per-node", "4",
                                 "--model", "vit_b_16", "--no-normalize", "--batch-size", "64"])
    assert config.run_options == {"model": "vit_b_16", "normalize": False, "batch_size": 64}  # type: ignore
    with pytest.raises(UsageError, match="not `run` options"):
        SlurmConfig("l", "o", 1, 1, run_options={"gpus": "0"})
    with pytest.raises(UsageError, match="--overwrite is refused"):
        SlurmConfig("l", "o", 1, 1, run_options={"overwrite": True})
