"""The command line's answers to bad input: broken config files, bad option values, bad usage;
and ``--help`` with an example on every command. Real processes in private XDG directories."""

from __future__ import annotations

import json

import pytest

from cli_support import cli, CLIENT, SERVER, one_line  # noqa: F401 (cli is a fixture)
from helpers import free_port

QUICK = 15.0  # a command that fails on its input answers at once; never wait long for it


BAD_CONFIGS = [
    # (program, file content, what the message must name)
    (CLIENT, '{"server": "ws://127.0.0.1:8200", "bogus": 1}', "unknown key 'bogus'"),
    (CLIENT, '{"adminPort": "abc"}', "key 'adminPort' must be a port number 1-65535"),
    (CLIENT, '{"server": "http://relay.example.com"}', "key 'server' must be a relay URL"),
    (CLIENT, '{"proxies": [{"localPort": 9090, "targetClient": "B", "targetPort": 70000}]}',
     "proxies[0]: key 'targetPort' must be a port number 1-65535"),
    (CLIENT, '{"proxies": [{"localPort": 9090}]}', "proxies[0]: missing key 'targetClient'"),
    (CLIENT, '{"poolCount": 65}', "key 'poolCount' must be a whole number from 0 to 64"),
    (CLIENT, '{"server": ', "not valid JSON"),
    (CLIENT, '["ws://127.0.0.1:8200"]', "expected a JSON object"),
    (SERVER, '{"prot": 8300}', "unknown key 'prot'"),
    (SERVER, '{"heartbeatTimeout": -1}', "key 'heartbeatTimeout' must be a number of seconds > 0"),
    (SERVER, '{"port": 99999}', "key 'port' must be a port number 1-65535"),
    (SERVER, '{"port": 8300,}', "not valid JSON"),
]


def _run_with(cli, module: str, command: list[str], config) -> object:
    args = ["--config", config]
    if module == CLIENT:
        args += ["--admin-port", free_port()]
    else:
        args += ["--host", "127.0.0.1", "--port", free_port()]
    return cli.run(module, *command, *args, timeout=QUICK)


@pytest.mark.parametrize("command", [[], ["start"]], ids=["foreground", "start"])
@pytest.mark.parametrize("module, content, expected", BAD_CONFIGS,
                         ids=[f"{m.split('_')[1]}-{e.split(' ')[0]}-{i}" for i, (m, _, e) in enumerate(BAD_CONFIGS)])
def test_bad_config_file_is_refused_naming_the_file_and_the_key(cli, module, content, expected, command):
    config = cli.root / "bad.json"
    config.write_text(content)
    result = _run_with(cli, module, command, config)
    assert result.returncode == 1, result.stdout + result.stderr
    line = one_line(result.stderr)
    assert line.startswith(f"error: {config}: ") and expected in line, line
    assert config.read_text() == content  # left as it was, for the user to fix
    role = "client" if module == CLIENT else "server"
    assert cli.worker(role, config) is None and not cli.files(role, config).pid_file.exists()


def test_bad_default_config_file_is_named_too(cli):
    cli.config_dir.mkdir(parents=True)
    (cli.config_dir / "client.json").write_text('{"clientID": "A"}')
    result = cli.client("start", "--admin-port", free_port(), timeout=QUICK)
    assert result.returncode == 1
    assert one_line(result.stderr).startswith(f"error: {cli.config_dir / 'client.json'}: unknown key 'clientID'")


def test_server_config_file_that_does_not_exist_is_refused(cli):
    missing = cli.root / "nowhere.json"
    result = cli.server("--config", missing, timeout=QUICK)
    assert result.returncode == 1
    assert one_line(result.stderr) == f"error: config file {missing} does not exist"


@pytest.mark.parametrize("args, expected", [
    (["--server", "relay.example.com:8200"], "server URL 'relay.example.com:8200' must look like ws://HOST:8200"),
    (["--client-id", "my laptop"], "client ID 'my laptop' is invalid"),
    (["--admin-port", "99999"], "--admin-port 99999"),
    (["--pool-count", "65"], "--pool-count 65 must be a whole number from 0 to 64"),
    (["--pool-count", "-1"], "--pool-count -1 must be a whole number from 0 to 64"),
])
@pytest.mark.parametrize("command", [[], ["start"]], ids=["foreground", "start"])
def test_bad_client_option_is_refused_and_not_saved(cli, args, expected, command):
    config = cli.root / "client.json"
    config.write_text(json.dumps({"server": "ws://127.0.0.1:8200", "clientId": "A"}))
    if "--admin-port" not in args:
        args = args + ["--admin-port", str(free_port())]
    result = cli.client(*command, "--config", config, *args, timeout=QUICK)
    assert result.returncode == 1
    assert expected in one_line(result.stderr)
    saved = config.read_text()
    assert args[1] not in saved  # a refused value is not saved, where it would break every later start
    assert json.loads(saved)["clientId"] == "A"


def test_client_check_config_checks_the_pool_count(cli):
    config = cli.root / "client.json"
    for good in (0, 64):
        config.write_text(json.dumps({"poolCount": good}))
        done = cli.client("check-config", "--config", config, timeout=QUICK)
        assert (done.returncode, done.stdout.strip()) == (0, f"config OK: {config}"), done.stderr
    for bad in (65, -1, True, "2", 2.5):
        config.write_text(json.dumps({"poolCount": bad}))
        done = cli.client("check-config", "--config", config, timeout=QUICK)
        assert done.returncode == 1, (bad, done.stdout)
        assert f"problem: {config}: key 'poolCount' must be a whole number from 0 to 64" in done.stderr, done.stderr


@pytest.mark.parametrize("args, expected", [
    (["--heartbeat-timeout", "-5"], "--heartbeat-timeout"),
    (["--heartbeat-timeout", "0"], "--heartbeat-timeout"),
    (["--port", "0"], "--port 0 is not a port number 1-65535"),
    (["--port", "70000"], "--port 70000 is not a port number 1-65535"),
])
def test_bad_server_option_is_refused(cli, args, expected):
    result = cli.server("--host", "127.0.0.1", "--no-auth", *args, timeout=QUICK)
    assert result.returncode == 1
    assert expected in one_line(result.stderr)


HELP = [
    (SERVER, []), (SERVER, ["start"]), (SERVER, ["stop"]), (SERVER, ["status"]), (SERVER, ["logs"]),
    (SERVER, ["token"]),
    (CLIENT, []), (CLIENT, ["start"]), (CLIENT, ["stop"]), (CLIENT, ["status"]), (CLIENT, ["logs"]),
    (CLIENT, ["proxy"]), (CLIENT, ["proxy", "create"]), (CLIENT, ["proxy", "list"]), (CLIENT, ["proxy", "delete"]),
    (CLIENT, ["clients"]),
]


@pytest.mark.parametrize("module, command", HELP, ids=[" ".join([m, *c]) for m, c in HELP])
def test_help_on_every_command_has_an_example(cli, module, command):
    result = cli.run(module, *command, "--help", timeout=QUICK)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("usage: python -m " + module)
    assert "example" in result.stdout
    assert "python -m " + module in result.stdout.split("example", 1)[1]
