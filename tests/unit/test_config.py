"""Tests for cserver.config: every option once, its checks, the dict the
workers get, the Limits it makes, and docs/options.rst generated from it.

Unit layer: nothing listens, nothing is opened."""

import io
import json
import pathlib
from contextlib import redirect_stderr, redirect_stdout

import attrs
from twisted.trial.unittest import SynchronousTestCase

from cserver import config as config_module
from cserver.config import DEFAULT_PORT, Config, flag_name, option_parameters, options_rst
from cserver.server import Limits
from cserver.tap import Options

OPTIONS_RST = pathlib.Path(__file__).resolve().parents[2] / "docs" / "options.rst"


class ConfigTests(SynchronousTestCase):
    """Config: the defaults, the checks, the dict form."""

    def test_the_command_line_defaults_are_the_config_defaults(self):
        """An empty command line gives Config's defaults, the port made a listening
        description (with the backlog)."""
        options = Options()
        options.parseOptions([])
        assert options.config == Config.from_options({})
        assert options.config == attrs.evolve(
            Config(), port="tcp:31337:interface=127.0.0.1:backlog=4096")
        assert Config().port == DEFAULT_PORT

    def test_every_field_is_an_option_of_twistd_cserver(self):
        """Each Config field is a --NAME of twistd cserver, listed by --help; all but --auth
        (from Twisted's AuthOptionMixin) are generated from the field."""
        usage = str(Options())
        generated = {parameter[0] for parameter in option_parameters()}
        for field in attrs.fields(Config):
            assert f"--{flag_name(field)}" in usage, field.name
        assert generated == {flag_name(f) for f in attrs.fields(Config)} - {"auth"}

    def test_from_options_checks_each_option_and_names_it(self):
        """Values are checked by their option, each error one line naming it."""
        for values, message in [
            ({"fsync": "sometimes"},
             "--fsync must be one of always, interval, never, not 'sometimes'"),
            ({"max-line": "many"}, "--max-line must be a whole number, not 'many'"),
            ({"idle-timeout": "-1"}, "--idle-timeout must be at least 0 s, not -1"),
            ({"journal": ""}, "--journal must name a file, not ''"),
            ({"users": " , "}, "--users names nobody: no one could authenticate"),
            ({"workers": 2, "port": "unix:/tmp/s"}, "--workers needs a tcp: or tcp6: --port "
             "(each worker gets its own SO_REUSEPORT socket)"),
            ({"restart-delay": 2, "restart-max-delay": 1},
             "--restart-max-delay must be at least --restart-delay"),
        ]:
            with self.assertRaises(ValueError) as caught:
                Config.from_options(values)
            assert str(caught.exception) == message, values

    def test_from_options_normalizes_what_it_keeps(self):
        """A bare port becomes a loopback tcp description, the users a tuple of names,
        numbers their type."""
        config = Config.from_options({"port": "4000", "users": "alice, bob,",
                                      "max-connections": "7", "work-delay": "1",
                                      "auth": ["memory:a:b"]})
        assert config.port == "tcp:4000:interface=127.0.0.1:backlog=4096"
        assert config.users == ("alice", "bob")
        assert (config.max_connections, config.work_delay) == (7, 1.0)
        assert config.auth == ("memory:a:b",)

    def test_a_config_goes_through_json_unchanged(self):
        """as_dict, JSON and from_dict give back an equal Config: what the workers get."""
        config = Config.from_options({"auth": ["memory:a:b"], "users": "x,y", "workers": "3",
                                      "metrics": "tcp:0", "restart-delay": "0.1"})
        assert Config.from_dict(json.loads(json.dumps(config.as_dict()))) == config

    def test_limits_come_from_the_config(self):
        """Limits.from_config carries the limit options; Limits' defaults are the options'."""
        config = Config.from_options({"max-connections": "5", "idle-timeout": "1",
                                      "auth-timeout": "2", "max-line": "100",
                                      "work-delay": "3", "auth-throttle": "0"})
        limits = Limits.from_config(config)
        assert attrs.asdict(limits) == attrs.asdict(Limits(
            max_connections=5, idle_timeout=1.0, auth_timeout=2.0, max_line=100,
            work_delay=3.0, auth_throttle=0))
        assert Limits.from_config(Config()) == Limits()


class OptionsDocumentTests(SynchronousTestCase):
    """docs/options.rst, generated from Config."""

    def test_docs_options_rst_is_up_to_date(self):
        """docs/options.rst is what ``python -m cserver.config --rst`` prints today:
        regenerate it after changing an option."""
        assert OPTIONS_RST.read_text(encoding="utf-8") == options_rst(), (
            "docs/options.rst is out of date: python -m cserver.config --rst > "
            "docs/options.rst")

    def test_the_table_lists_every_option_with_its_help(self):
        """Each option's row holds its name, and its help text's first words."""
        table = options_rst()
        for field in attrs.fields(Config):
            assert f"``--{flag_name(field)}``" in table
            help_text = config_module.option_help(field.name)
            assert " ".join(help_text.split()[:3]) in " ".join(table.split())

    def test_main_prints_the_table_and_refuses_other_arguments(self):
        """``--rst`` prints the table (exit 0); anything else prints the usage (exit 2)."""
        out = io.StringIO()
        with redirect_stdout(out):
            assert config_module.main(["--rst"]) == 0
        assert out.getvalue() == options_rst()
        err = io.StringIO()
        with redirect_stderr(err):
            assert config_module.main([]) == 2
        assert "usage: python -m cserver.config --rst" in err.getvalue()
