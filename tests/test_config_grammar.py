"""The one config grammar (spp_jax.config_grammar): types, ranges, presets, --help, JSON files."""
import dataclasses
import json
from typing import Optional

import pytest

from spp_jax import config_grammar as G
from spp_jax.errors import ConfigError, UserError


def _even(v):
    return None if v % 2 == 0 else "must be even"


@dataclasses.dataclass
class Toy:
    name: str = G.option("a", "a name", group="first", choices=("a", "b"))
    flag: bool = G.option(False, "a switch")
    count: int = G.option(2, "how many", ge=1, check=_even)
    rate: float = G.option(0.5, "a fraction", gt=0, lt=1)
    sizes: tuple[int, ...] = G.option((1, 2), "sides", group="second", ge=1, min_len=1)
    pair: tuple[int, float] = G.option((1, 2.0), "a fixed pair")
    limit: Optional[int] = G.option(None, "optional cap", ge=0)
    free: str = "x"  # a plain field: no help, no rule
    late: int = G.option(7, "added after files were written", optional_in_file=True)

    def cross_check(self):
        if self.flag and self.count > 4:
            raise ConfigError("flag=true needs count <= 4")

    def resolve(self, explicit):
        # name=b implies a longer sizes tuple unless the caller gave one
        if self.name == "b" and "sizes" not in explicit:
            return dataclasses.replace(self, sizes=(3, 4, 5))
        return self


PRESETS = {"plain": {}, "big": {"count": 8, "sizes": (5, 6)}}


def test_each_type_parses_from_text():
    c = G.apply_overrides(Toy(), ["name=b", "flag=yes", "count=4", "rate=.25", "sizes=(7, 8,9)",
                                  "pair=3,0.5", "limit=none", "free=hello world"])
    assert c == Toy(name="b", flag=True, count=4, rate=0.25, sizes=(7, 8, 9), pair=(3, 0.5),
                    limit=None, free="hello world")
    for text, want in [("true", True), ("ON", True), ("1", True), ("no", False), ("off", False), ("0", False)]:
        assert G.parse_value("flag", text, bool) is want
    assert G.apply_overrides(Toy(), ["limit=5"]).limit == 5
    assert G.apply_overrides(Toy(), ["free="]).free == ""
    assert G.parse_value("t", "", tuple[int, ...]) == ()
    assert G.parse_value("t", "[1]", tuple[int, ...]) == (1,)
    assert G.apply_overrides(Toy(), ["count=2", "count=6"]).count == 6  # the later one wins


@pytest.mark.parametrize("item, message", [
    ("nope=1", "unknown config key 'nope'; valid keys: name, flag, count, rate, sizes, pair, limit, free, late"),
    ("count", "override 'count' is not key=value"),
    ("name=c", "name=c: must be one of: a, b"),
    ("flag=maybe", "flag: expected a bool (true/false), got 'maybe'"),
    ("count=2.0", "count: expected an int, got '2.0'"),
    ("count=0", "count=0: must be >= 1"),
    ("count=3", "count=3: must be even"),
    ("rate=1", "rate=1.0: must be in (0, 1)"),
    ("rate=nan", "rate=nan: must be a finite number"),
    ("rate=inf", "rate=inf: must be a finite number"),
    ("rate=-inf", "rate=-inf: must be a finite number"),
    ("rate=half", "rate: expected a float, got 'half'"),
    ("sizes=", "sizes='': must have at least 1 value"),
    ("sizes=2,0", "sizes=2,0: each value must be >= 1 (got 0)"),
    ("sizes=2,x", "sizes: expected an int, got 'x'"),
    ("pair=1,2,3", "pair: expected 2 comma-separated values, got '1,2,3'"),
    ("limit=-1", "limit=-1: must be >= 0"),
    ("limit=many", "limit: expected an int, got 'many'"),
])
def test_each_error_is_one_line_naming_key_and_allowed_values(item, message):
    with pytest.raises(ConfigError) as e:
        G.apply_overrides(Toy(), [item])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, UserError)


def test_cross_check_and_resolve_hooks():
    with pytest.raises(ConfigError, match="flag=true needs count <= 4"):
        G.apply_overrides(Toy(), ["flag=true", "count=6"])
    assert G.apply_overrides(Toy(), ["name=b"]).sizes == (3, 4, 5)  # derived: the user left sizes open
    assert G.apply_overrides(Toy(), ["name=b", "sizes=9"]).sizes == (9,)  # the user's choice stands


def test_presets_then_keywords_then_overrides():
    assert G.from_preset(Toy, PRESETS, "plain") == Toy()
    c = G.from_preset(Toy, PRESETS, "big", ["sizes=9"], count=10)
    assert (c.count, c.sizes) == (10, (9,))
    assert G.from_preset(Toy, PRESETS, "big", ["count=12"], count=10).count == 12
    with pytest.raises(ConfigError, match="unknown preset 'huge'; valid: plain, big"):
        G.from_preset(Toy, PRESETS, "huge")
    with pytest.raises(ConfigError, match="unknown config key 'size'"):
        G.from_preset(Toy, PRESETS, "plain", size=3)
    with pytest.raises(ConfigError, match=r"sizes: expected a comma-separated list of ints, got '3'"):
        G.from_preset(Toy, PRESETS, "plain", sizes="3")  # Python values are type checked too
    assert G.from_preset(Toy, PRESETS, "plain", sizes=[3, 4], rate=1 // 2 + 0.5).sizes == (3, 4)


def test_check_value_for_library_arguments():
    assert G.check_value("n", 3, int, ge=1) == 3
    assert G.check_value("w", 1, float, gt=0) == 1.0 and isinstance(G.check_value("w", 1, float), float)
    with pytest.raises(ConfigError, match=r"^n=0: must be >= 1$"):
        G.check_value("n", 0, int, ge=1)
    with pytest.raises(ConfigError, match="n: expected an int, got True"):
        G.check_value("n", True, int)


def test_help_lists_every_key_with_default_rule_and_group():
    text = G.help_text(Toy, PRESETS)
    lines = text.splitlines()
    for f in dataclasses.fields(Toy):
        assert any(ln.strip().startswith(f"{f.name}=") for ln in lines), f.name
    assert "  count=2" in text and "how many [>= 1]" in text
    assert "rate=0.5" in text and "[in (0, 1)]" in text
    assert "[one of: a, b]" in text and "limit=none" in text and "sizes=1,2" in text
    assert lines.index("first:") < lines.index("second:")
    assert "  big: count=8 sizes=5,6" in text and "  plain: (the defaults above)" in text


def test_cli_parser_help_and_intermixed_arguments(capsys):
    ap = G.cli_parser(Toy, "toy tool", presets=PRESETS, default_preset="plain")
    ap.add_argument("--out")
    args = ap.parse_intermixed_args(["count=4", "--out", "d", "--preset", "big", "rate=0.1"])
    assert (args.out, args.preset, args.overrides) == ("d", "big", ["count=4", "rate=0.1"])
    with pytest.raises(SystemExit) as e:
        ap.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "toy tool" in out and "count=2" in out and "--preset" in out


def test_user_errors_prints_one_line_and_exits_1():
    with pytest.raises(SystemExit) as e:
        with G.user_errors():
            G.apply_overrides(Toy(), ["count=0"])
    assert e.value.code == "error: count=0: must be >= 1"  # sys.exit(str): stderr, status 1
    with pytest.raises(SystemExit) as e:
        with G.user_errors(FileNotFoundError):
            raise FileNotFoundError("no checkpoints in w")
    assert e.value.code == "error: no checkpoints in w"
    with pytest.raises(KeyError):  # anything else is a bug: it keeps its traceback
        with G.user_errors():
            raise KeyError("x")


def test_json_round_trip(tmp_path):
    c = Toy(name="b", flag=True, count=4, rate=1 / 3, sizes=(3,), pair=(2, 0.1), limit=9, free="")
    path = G.write_config(c, tmp_path / "out")
    assert path == str(tmp_path / "out" / "config.json")
    assert json.load(open(path))["sizes"] == [3]
    assert G.read_config(Toy, path) == c  # exact floats, tuples back, no resolve on read
    assert not list((tmp_path / "out").glob("*.tmp"))


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a readable JSON config file"),
    ("", "not a readable JSON config file"),
    (b"\xff\xfe\x00garbage", "not a readable JSON config file"),
    ("[1, 2]", "expected a JSON object of config keys, got list"),
    ({"count": "4"}, "count: expected an int, got '4'"),
    ({"count": 4.0}, "count: expected an int, got 4.0"),
    ({"flag": 1}, r"flag: expected a bool \(true/false\), got 1"),
    ({"sizes": 3}, "sizes: expected a comma-separated list of ints, got 3"),
    ({"rate": 2.0}, r"rate=2.0: must be in \(0, 1\)"),
    ({"name": "z"}, "name=z: must be one of: a, b"),
    ({"extra": 1}, "unknown config key 'extra'"),
    ({"count": 6, "flag": True}, "flag=true needs count <= 4"),
])
def test_bad_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "config.json"
    if isinstance(content, dict):
        good = json.load(open(G.write_config(Toy(), tmp_path)))
        content = json.dumps({**good, **content})
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message) as e:
        G.read_config(Toy, path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_missing_keys(tmp_path):
    raw = json.load(open(G.write_config(Toy(), tmp_path)))
    del raw["rate"], raw["free"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=f"^{tmp_path}/config.json: missing keys rate, free"):
        G.read_config(Toy, tmp_path / "config.json")
    raw = json.load(open(G.write_config(Toy(late=3), tmp_path)))
    del raw["late"]  # declared optional_in_file: a file from before the key existed
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert G.read_config(Toy, tmp_path / "config.json").late == 7
    with pytest.raises(ConfigError, match="no such config file"):
        G.read_config(Toy, tmp_path / "absent.json")
