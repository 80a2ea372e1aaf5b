"""Credentials, command lines, node and run configs: secure by default, errors that say what to do."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.common.config import parse_config_args

from fedfew_med.flower import commands, launch, supervise
from fedfew_med.flower.coordinator import ServerConfigError, ServerSettings
from fedfew_med.flower.node import NodeConfigError, NodeSettings
from tests.flower.conftest import write_config


def test_credentials_form_a_chain_and_keys_flower_accepts(tmp_path):
    creds = launch.make_credentials(tmp_path / "c", sites=["site-a", "site-b"], hosts=["127.0.0.1", "link.example.org"])
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["link.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for site, (private, public) in creds.node_keys.items():
        key = load_ssh_private_key(private.read_bytes(), None)  # what flower-supernode does
        pub = load_ssh_public_key(public.read_bytes())  # what `flwr supernode register` does
        assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)
        assert key.public_key().public_numbers() == pub.public_numbers()  # type: ignore[union-attr]
        assert private.stat().st_mode & 0o077 == 0 and public.read_text().strip().endswith(site)
    assert creds.server_key.stat().st_mode & 0o077 == 0 and creds.ca_key.stat().st_mode & 0o077 == 0
    with pytest.raises(FileExistsError, match="overwrite"):
        launch.make_credentials(tmp_path / "c", sites=["site-a"])
    with pytest.raises(ValueError, match="site name"):
        launch.make_credentials(tmp_path / "d", sites=["a b"])


def test_commands_are_secure_unless_insecure_is_asked_for(tmp_path, caplog):
    creds = launch.make_credentials(tmp_path, sites=["s"])
    link = launch.superlink_command(credentials=creds, port=9999, database=tmp_path / "db")
    assert "--enable-supernode-auth" in link and "--insecure" not in link
    assert "--disable-runtime-dependency-installation" in link
    assert link[link.index("--ssl-certfile") + 1] == str(creds.server_cert)
    node = launch.supernode_command(superlink="h:1", node_config={"state-dir": "/s", "site-index": 2},
                                    root_certificates=creds.ca_cert, private_key=creds.node_keys["s"][0])
    assert node[node.index("--auth-supernode-private-key") + 1] == str(creds.node_keys["s"][0])
    assert "--insecure" not in node
    with pytest.raises(ValueError, match="insecure=True"):
        launch.superlink_command(credentials=None)
    with pytest.raises(ValueError, match="private key"):
        launch.supernode_command(superlink="h:1", node_config={}, root_certificates=creds.ca_cert)
    caplog.set_level(logging.WARNING, logger="fedfew_med")
    insecure = launch.superlink_command(credentials=None, insecure=True)
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure
    assert "TLS and SuperNode authentication are OFF" in caplog.text


def test_config_arg_is_parsed_back_by_flower():
    values = {"site-config": "/srv/my site/site.toml", "site-index": 3, "timeout": 2.5, "resume": True, "uni": "/tmp/é"}
    assert parse_config_args([launch.config_arg(values)]) == values
    with pytest.raises(ValueError, match="double quote"):
        launch.config_arg({"a": 'x"y'})


def test_connection_file_is_merged_and_flwr_reads_it(tmp_path, monkeypatch):
    launch.write_connection(tmp_path, "other", address="10.0.0.1:9091", insecure=True)
    launch.write_connection(tmp_path, "fed", address="127.0.0.1:9091", root_certificates=tmp_path / "ca.crt")
    data = tomllib.loads((tmp_path / "config.toml").read_text())
    assert data["superlink"]["default"] == "fed" and data["superlink"]["other"]["insecure"] is True
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    from flwr.cli.flower_config import read_superlink_connection

    conn = read_superlink_connection("fed")
    assert conn.address == "127.0.0.1:9091" and conn.root_certificates == str((tmp_path / "ca.crt").resolve())
    assert not conn.insecure


def test_the_app_bundle_declares_every_server_setting_with_its_default():
    app = tomllib.loads((launch.APP_DIR / "pyproject.toml").read_text())
    flwr_app = app["tool"]["flwr"]["app"]
    assert flwr_app["components"] == {"serverapp": "fedfew_med.flower.server_app:app",
                                      "clientapp": "fedfew_med.flower.client_app:app"}
    defaults = flwr_app["config"]
    assert list(defaults) == list(ServerSettings.KEYS)
    with_paths = {**defaults, "federation-config": "/f.toml", "run-dir": "/r"}
    settings = ServerSettings.from_run_config(with_paths)
    assert settings == ServerSettings(federation_config=Path("/f.toml"), run_dir=Path("/r"))


def test_the_app_bundle_builds_without_code(tmp_path):
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(launch.APP_DIR))).namelist()
    assert sorted(names) == [".info/CONTENT", "pyproject.toml"]  # the code comes from the installed package


@pytest.mark.parametrize(
    ("run_config", "message"),
    [
        ({"run-dir": "/r"}, "must set federation-config"),
        ({"federation-config": "rel.toml", "run-dir": "/r"}, "absolute path"),
        ({"federation-config": "/f", "run-dir": "/r", "min-sites": 0}, "min-sites must be an integer >= 1"),
        ({"federation-config": "/f", "run-dir": "/r", "round-timeout": 0}, "round-timeout must be a number of seconds > 0"),
        ({"federation-config": "/f", "run-dir": "/r", "resume": 1}, "resume must be true or false"),
        ({"federation-config": "/f", "run-dir": "/r", "rounds": 3}, "unknown key 'rounds'"),
    ],
)
def test_run_config_errors(run_config, message):
    with pytest.raises(ServerConfigError, match=message):
        ServerSettings.from_run_config(run_config)


def test_run_config_accepts_integers_for_seconds():
    s = ServerSettings.from_run_config({"federation-config": "/f", "run-dir": "/r", "round-timeout": 40, "stop-after": 2})
    assert s.round_timeout == 40.0 and isinstance(s.round_timeout, float) and s.stop_after == 2


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({}, "must set state-dir"),
        ({"state-dir": "/s"}, "must name the site's data"),
        ({"state-dir": "s", "site-config": "/x.toml"}, "absolute path"),
        ({"state-dir": "/s", "site-config": "/x.toml", "site-index": 1}, "not both"),
        ({"state-dir": "/s", "federation-config": "/f.toml", "site-index": -1}, "site-index must be an integer >= 0"),
        ({"state-dir": "/s", "partition-id": 0}, "unknown key 'partition-id'"),
    ],
)
def test_node_config_errors(node_config, message):
    with pytest.raises(NodeConfigError, match=message):
        NodeSettings.from_node_config(node_config)


def test_a_synthetic_site_by_index_and_its_bounds(tmp_path):
    path = tmp_path / "fed.toml"
    write_config(path)
    settings = NodeSettings.from_node_config({"state-dir": str(tmp_path), "federation-config": str(path), "site-index": 1})
    assert settings.load_site().name == "site01-dark"
    bad = NodeSettings.from_node_config({"state-dir": str(tmp_path), "federation-config": str(path), "site-index": 3})
    with pytest.raises(NodeConfigError, match="between 0 and 2"):
        bad.load_site()


def test_a_site_config_goes_through_load_site(tmp_path, monkeypatch):
    import fedfew_med.data.sites as sites_module

    path = tmp_path / "fed.toml"
    write_config(path)
    from fedfew_med.config import load_federation
    from fedfew_med.data import build_sites

    site = build_sites(load_federation(path).data)[2]
    seen = []
    monkeypatch.setattr(sites_module, "load_site", lambda p: seen.append(p) or site)
    settings = NodeSettings.from_node_config({"state-dir": str(tmp_path), "site-config": str(tmp_path / "site.toml")})
    assert settings.load_site() is site and seen == [tmp_path / "site.toml"]


def test_cli_steps_build_the_same_commands(tmp_path, monkeypatch):
    import argparse

    parser = argparse.ArgumentParser()
    lines: list[str] = []
    commands.add_parser(parser.add_subparsers(dest="command"), out=lines.append)
    args = parser.parse_args(["flower", "credentials", str(tmp_path / "c"), "--site", "a", "--site", "b"])
    assert args.func(args) == 0 and any("nodes/a.pub" in x for x in lines)
    execs: list[list[str]] = []
    monkeypatch.setattr(supervise, "supervise", lambda cmd, **kw: execs.append(list(cmd)) or 0)
    args = parser.parse_args(["flower", "superlink", "--credentials", str(tmp_path / "c"), "--host", "0.0.0.0"])
    args.func(args)
    assert "--enable-supernode-auth" in execs[-1] and str(tmp_path / "c" / "superlink.db") in execs[-1]
    fed = tmp_path / "f.toml"
    fed.write_text((Path(__file__).resolve().parents[2] / "site_configs" / "demo_federation.toml").read_text())
    args = parser.parse_args(["flower", "supernode", "--superlink", "127.0.0.1:1", "--ca", "ca.crt", "--key", "k",
                              "--state-dir", "st", "--federation-config", str(fed), "--site-index", "1"])
    args.func(args)
    node_config = parse_config_args([execs[-1][execs[-1].index("--node-config") + 1]])
    assert node_config == {"state-dir": str(Path("st").resolve()), "federation-config": str(fed.resolve()), "site-index": 1}
    # the site was loaded before connecting, and the unreachable SuperLink was named with the cause
    assert any(line.startswith("site ") and "training records" in line for line in lines)
    assert any("the SuperLink at 127.0.0.1:1 cannot be reached now (Connection refused)" in line for line in lines)
    args = parser.parse_args(["flower", "supernode", "--superlink", "h:9091", "--state-dir", "st", "--site-config", "s.toml"])
    from fedfew_med.config import ConfigError

    with pytest.raises(ConfigError, match="--ca"):
        args.func(args)
    args = parser.parse_args(["flower", "connect", "fed", "--superlink", "h:9091", "--ca", str(tmp_path / "c" / "ca.crt"),
                              "--flwr-home", str(tmp_path / "home")])
    assert args.func(args) == 0 and (tmp_path / "home" / "config.toml").exists()


def test_supernode_validates_its_site_before_it_starts(tmp_path, monkeypatch, capsys):
    """A missing site file is a one-line error (exit 2); a site whose data has problems is not started (exit 1)."""
    from fedfew_med.cli import main

    execs: list[list[str]] = []
    monkeypatch.setattr(supervise, "supervise", lambda cmd, **kw: execs.append(list(cmd)) or 0)
    base = ["flower", "supernode", "--superlink", "127.0.0.1:1", "--insecure", "--state-dir", str(tmp_path / "st")]
    assert main([*base, "--site-config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err and execs == []
    site = tmp_path / "site.toml"
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"not a png")
    (tmp_path / "labels.csv").write_text("image,label\nimgs/a.png,0\nimgs/b.png,1\n")
    site.write_text('[site]\nname = "h-a"\ntask = "classification"\n[source]\nkind = "images_csv"\nroot = "."\n'
                    'csv = "labels.csv"\nimage_column = "image"\nlabel_column = "label"\n[labels]\nnames = ["no", "yes"]\n'
                    '[preprocessing]\nspatial_size = [16, 16]\n')
    assert main([*base, "--site-config", str(site)]) == 1
    out = capsys.readouterr().out
    assert "a.png" in out and "this SuperNode was not started" in out and execs == []


def test_the_flower_steps_are_fedfew_med_subcommands(tmp_path, capsys):
    from fedfew_med.cli import main

    assert main(["flower", "credentials", str(tmp_path / "c"), "--site", "h-a", "--host", "127.0.0.1"]) == 0
    assert "nodes/h-a.pub" in capsys.readouterr().out and (tmp_path / "c" / "server.pem").is_file()
    assert main(["flower", "superlink"]) == 2  # neither credentials nor an explicit --insecure
    assert "--credentials" in capsys.readouterr().err


def test_a_policy_refuses_an_insecure_deployment_before_anything_starts(tmp_path, monkeypatch, capsys):
    """``--policy`` checks TLS and site authentication (check_deployment), worded as ``simulate --policy``."""
    from fedfew_med.cli import main

    policy = tmp_path / "policy.toml"
    policy.write_text('[policy]\nname = "consortium"\nrequire_tls = true\nrequire_authenticated_sites = true\n')
    execs: list[list[str]] = []
    monkeypatch.setattr(supervise, "supervise", lambda cmd, **kw: execs.append(list(cmd)) or 0)
    assert main(["flower", "superlink", "--insecure", "--policy", str(policy)]) == 2
    err = capsys.readouterr().err
    assert f"this SuperLink (--insecure) breaks the privacy policy {policy} (consortium); nothing was started:" in err
    assert "the deployment breaks rule require_tls: required TLS, has no TLS" in err
    assert "the deployment breaks rule require_authenticated_sites: required authenticated sites, has no authenticated sites" in err
    assert main(["flower", "supernode", "--insecure", "--superlink", "h:9091", "--state-dir", str(tmp_path / "st"),
                 "--site-config", str(tmp_path / "s.toml"), "--policy", str(policy)]) == 2
    assert "this SuperNode (--insecure) breaks the privacy policy" in capsys.readouterr().err
    assert execs == []  # nothing was started
    main(["flower", "credentials", str(tmp_path / "c"), "--site", "a", "--host", "127.0.0.1"])
    assert main(["flower", "superlink", "--credentials", str(tmp_path / "c"), "--policy", str(policy)]) == 0
    assert len(execs) == 1  # a secure SuperLink complies and starts
    home = tmp_path / "home"
    assert main(["flower", "connect", "test", "--superlink", "h:9091", "--insecure", "--flwr-home", str(home)]) == 0
    assert main(["flower", "run", "test", "--federation-config", "f.toml", "--run-dir", "r", "--flwr-home", str(home),
                 "--policy", str(policy)]) == 2
    assert "connection 'test' (insecure) breaks the privacy policy" in capsys.readouterr().err
    lax = tmp_path / "lax.toml"
    lax.write_text("[policy]\nrequire_tls = false\nrequire_authenticated_sites = false\n")
    assert main(["flower", "superlink", "--insecure", "--policy", str(lax)]) == 0 and len(execs) == 2


def test_flower_run_takes_set_overrides_as_simulate_does(tmp_path, monkeypatch):
    """`flower run --set`: checked on this machine, carried in the run config, applied by the ServerApp's loader."""
    from fedfew_med.cli import main
    from fedfew_med.config import load_federation
    from fedfew_med.flower.coordinator import ServerSettings

    fed = Path(__file__).resolve().parents[2] / "site_configs" / "demo_federation.toml"
    runs: list[list[str]] = []
    monkeypatch.setattr(supervise, "supervise", lambda cmd, **kw: runs.append(cmd) or 0)  # flwr run, supervised
    base = ["flower", "run", "fed", "--federation-config", str(fed), "--run-dir", str(tmp_path / "run"),
            "--flwr-home", str(tmp_path / "home")]
    assert main([*base, "--set", "training.lr=0.02", "--set", "algorithm.name='fedavg'", "--set", "algorithm.params={}"]) == 0
    run_config = parse_config_args([runs[-1][runs[-1].index("--run-config") + 1]])
    settings = ServerSettings.from_run_config(run_config)
    assert settings.overrides == ("training.lr=0.02", "algorithm.name='fedavg'", "algorithm.params={}")
    config = load_federation(settings.federation_config, list(settings.overrides))  # what server_app.main does
    assert config.training.lr == 0.02 and config.algorithm.name == "fedavg"
    assert main([*base, "--set", 'algorithm.name="fedavg"']) == 2  # double quotes cannot travel in --run-config
    assert main([*base, "--set", "training.lrr=0.02"]) == 2  # an unknown key fails here, before anything starts
    assert len(runs) == 1
