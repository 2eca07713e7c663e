"""Config parsing: defaults, every key, and one clear line naming the bad key."""
import pytest

from hostdevd.core.address import PciAddress as A
from hostdevd.core.config import DeviceMatcher, load_config, parse_config
from hostdevd.core.errors import ConfigError

FULL = """
libvirt_uri = "qemu+ssh://host/system"
state_dir = "/tmp/hd"
write_timeout = 3.5
[policy]
allow = ["10de:*", "01:00.0"]
deny = ["8086:1521"]
allow_host_critical = ["0000:00:02.0"]
[reset]
default = "auto"
devices = { "0000:01:00.0" = "flr", "10de:1b80" = "bus" }
"""


def test_defaults():
    c = parse_config("")
    assert c.libvirt_uri == "qemu:///system" and c.state_dir == "/var/lib/hostdevd"
    assert c.policy.allow == [] and c.write_timeout == 10.0


def test_full_config_normalises_matchers():
    c = parse_config(FULL)
    assert c.policy.allow == ["10de:*", "0000:01:00.0"]
    assert c.reset_preference(A.parse("01:00.0"), "10de", "1b80") == "flr"
    assert c.reset_preference(A.parse("02:00.0"), "10de", "1b80") == "bus"
    assert c.reset_preference(A.parse("02:00.0"), "8086", "1234") == "auto"


@pytest.mark.parametrize("text,key", [
    ("bogus = 1", "bogus: unknown key"),
    ("[policy]\ndeny = ['zz:zz']", "policy.deny[0]"),
    ("[policy]\nallow = [1]", "policy.allow[0]"),
    ("write_timeout = -1", "write_timeout"),
    ("[reset]\ndefault = 'sometimes'", "reset.default"),
    ("[reset]\ndevices = { 'nope' = 'flr' }", "reset.devices"),
    ("[policy\n", "not valid TOML"),
])
def test_bad_config_one_line_naming_key(text, key):
    with pytest.raises(ConfigError) as e:
        parse_config(text, "/etc/hostdevd/hostdevd.toml")
    msg = str(e.value)
    assert key in msg and "\n" not in msg and msg.startswith("/etc/hostdevd/hostdevd.toml")


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "nope.toml"))


def test_matcher():
    m = DeviceMatcher(["10de:*", "0000:03:00.0"])
    assert m.matches(A.parse("01:00.0"), "10de", "1b80")
    assert m.matches(A.parse("03:00.0"), "8086", "1234")
    assert not m.matches(A.parse("03:00.1"), "8086", "1234")
